//! The agent as its systemd unit runs it: `deploy/systemd/plexd-metrics.service`, unchanged,
//! started by systemd as PID 1 with every sandboxing option the unit sets (capabilities,
//! seccomp, read-only file system, private /dev and /tmp, invisible /proc, address families,
//! the state directory). Only the VM's systemd boot has that (`cargo xtask integration-test
//! vm`, see `xtask/src/vm/systemd.rs`): this target has `test = false`.
//!
//! Node 0 of a kernel WireGuard mesh is the VM's own network namespace, where the unit runs;
//! its peer is in a namespace of its own. The agent reports to a test control plane over
//! HTTPS with the token and CA from /etc/plexd-metrics. One scenario, three units: as
//! shipped, where every expectation must hold; and with a drop-in that takes `bpf()` out of
//! the system call filter and raw sockets (ICMP) out of the capabilities, or netlink out of
//! the address families, where the same expectations must fail, each naming what the
//! sandbox broke. That the check fails under a
//! sandbox that is too tight is what makes its passing under the shipped unit mean something.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use plexd_metrics::api::MetricPoint;
use plexd_metrics::collector::{LatencyResult, TunnelStats};
use plexd_metrics_tests::control_plane::TestControlPlane;
use plexd_metrics_tests::kernel_mesh::KernelMesh;
use plexd_metrics_tests::{health_probe, ours, require_privileges, tc_state, NetNs};
use serde_json::Value;

/// The unit, as installed from `deploy/systemd`.
const UNIT: &str = "plexd-metrics.service";
/// Where the unit's `--config` and the files it names live.
const CONFIG_DIR: &str = "/etc/plexd-metrics";
/// Drop-ins of the negative cases go here and are removed after them.
const DROP_IN_DIR: &str = "/etc/systemd/system/plexd-metrics.service.d";
/// The health endpoint's default address, which the config leaves as it is.
const HEALTH: &str = "127.0.0.1:9102";
/// The state directory the unit has systemd create, where the durable queue lives.
const STATE_DIR: &str = "/var/lib/plexd-metrics";
const NODE_ID: &str = "vm-node-0";
const TOKEN: &str = "unit-token-1";
/// The peer's name in the reports.
const PEER: &str = "node-1";
/// Bound on one report, guest time: the first comes after the kernel programs were loaded
/// (tens of seconds in 6.1's verifier under emulation) and one report interval.
const REPORT_DEADLINE: Duration = Duration::from_secs(180);
/// Bound on one `systemctl` or `journalctl` call.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
/// Reports read at most, until every group has come: the shipped unit's first report has
/// them all (two collect cycles); a group missing from two is not coming.
const REPORTS: usize = 2;
/// The capabilities the unit leaves: bits of CAP_NET_ADMIN (12), CAP_NET_RAW (13),
/// CAP_PERFMON (38) and CAP_BPF (39).
const UNIT_CAPABILITIES: u64 = 1 << 12 | CAP_NET_RAW | 1 << 38 | 1 << 39;
/// CAP_NET_RAW's bit: raw ICMP sockets, for the latency probes.
const CAP_NET_RAW: u64 = 1 << 13;

/// Runs `program` with `args` and returns its stdout, or why not: it could not start, did not
/// end within [`COMMAND_DEADLINE`] (it is killed then), or did not succeed.
fn try_run(program: &str, args: &[&str]) -> Result<String, String> {
    let shown = format!("`{program} {}`", args.join(" "));
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out: Output = match rx.recv_timeout(COMMAND_DEADLINE) {
        Ok(out) => out.map_err(|e| format!("cannot wait for {shown}: {e}"))?,
        Err(_) => {
            // Only the child this function started, by its own pid.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(format!("{shown} did not end within {COMMAND_DEADLINE:?}"));
        }
    };
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`try_run`], failing the test when it fails.
fn run_within(program: &str, args: &[&str]) -> String {
    try_run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// [`try_run`] in a clean-up, where a panic would abort the test binary: a failure is
/// printed, and the test's own assertions say what it broke.
fn clean_up(program: &str, args: &[&str]) {
    if let Err(e) = try_run(program, args) {
        eprintln!("clean-up: {e}");
    }
}

fn systemctl(args: &[&str]) -> String {
    run_within("systemctl", args)
}

/// One property of the unit, as `systemctl show` gives it.
fn unit_property(name: &str) -> String {
    systemctl(&["show", "--property", name, "--value", UNIT])
        .trim()
        .to_owned()
}

/// A drop-in for the unit, in force from [`DropIn::install`] until it is dropped.
struct DropIn {
    path: std::path::PathBuf,
}

impl DropIn {
    fn install(name: &str, text: &str) -> Self {
        std::fs::create_dir_all(DROP_IN_DIR).expect("create the drop-in directory");
        let path = Path::new(DROP_IN_DIR).join(format!("{name}.conf"));
        std::fs::write(&path, text).expect("write the drop-in");
        systemctl(&["daemon-reload"]);
        let drop_ins = unit_property("DropInPaths");
        assert!(
            drop_ins.contains(&path.display().to_string()),
            "systemd took the drop-in: {drop_ins}"
        );
        Self { path }
    }
}

impl Drop for DropIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        clean_up("systemctl", &["daemon-reload"]);
    }
}

/// The unit started; stopped (and its state directory removed) on drop, so that the next
/// case starts from nothing, with no points queued by this one.
struct Started;

impl Started {
    fn start() -> Self {
        remove_state().unwrap_or_else(|e| panic!("cannot remove {STATE_DIR}: {e}"));
        systemctl(&["start", UNIT]);
        Started
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        clean_up("systemctl", &["stop", UNIT]);
        if let Err(e) = remove_state() {
            eprintln!("clean-up: cannot remove {STATE_DIR}: {e}");
        }
        // A unit that failed stays listed as failed (a unit that did not has nothing to reset,
        // and systemctl says so).
        let _ = try_run("systemctl", &["reset-failed", UNIT]);
    }
}

/// Removes the state directory and the points queued in it (`systemctl clean` would, but it
/// needs D-Bus, which the VM does without).
fn remove_state() -> std::io::Result<()> {
    match std::fs::remove_dir_all(STATE_DIR) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The mesh, the control plane, and the agent's config in /etc/plexd-metrics.
struct Scenario {
    mesh: KernelMesh,
    cp: TestControlPlane,
}

impl Scenario {
    fn new() -> Self {
        let init = NetNs::of_init("pin").expect("name PID 1's network namespace");
        let mesh = KernelMesh::with_first_in(init, 2).expect("build the kernel WireGuard mesh");
        assert_eq!(mesh.ping(0, 1, 3, "0.05").expect("handshake"), 3);
        let cp = TestControlPlane::https();
        cp.require_token(TOKEN);
        // As the unit's header installs them: the directory 0750, the token 0600.
        std::fs::create_dir_all(CONFIG_DIR).expect("create the config directory");
        let dir = Path::new(CONFIG_DIR);
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
            .expect("chmod the config directory");
        std::fs::write(dir.join("token"), TOKEN).expect("write the token");
        std::fs::set_permissions(dir.join("token"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod the token");
        std::fs::write(dir.join("ca.pem"), cp.ca_pem()).expect("write the CA");
        let config = format!(
            "node_id: {NODE_ID}\n\
             control_plane:\n  url: {}\n  token_file: {CONFIG_DIR}/token\n  ca_file: {CONFIG_DIR}/ca.pem\n\
             metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  wireguard:\n    peer_names:\n      {}: {PEER}\n",
            cp.url(),
            mesh.nodes[1].keys.public
        );
        std::fs::write(dir.join("config.yaml"), config).expect("write the config");
        Self { mesh, cp }
    }

    /// Starts the unit (with `drop_in` in force, if any), reads its reports, probes and
    /// process, stops it, and returns what was seen.
    fn run(&self, drop_in: Option<(&str, &str)>) -> Observed {
        let _drop_in = drop_in.map(|(name, text)| DropIn::install(name, text));
        let started = Started::start();
        let invocation = unit_property("InvocationID");
        let pid: u32 = unit_property("MainPID").parse().expect("a MainPID");
        let read = |file: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_else(|e| {
                panic!(
                    "the agent's {file} (MainPID {pid}): {e}; its journal:\n{}",
                    journal(&invocation)
                )
            })
        };
        let (status, mountinfo) = (read("status"), read("mountinfo"));

        let mut points = Vec::new();
        for _ in 0..REPORTS {
            let Some(request) = self.cp.next_within(REPORT_DEADLINE) else {
                panic!(
                    "no report within {REPORT_DEADLINE:?}; the unit:\n{}\nthe agent's journal:\n{}",
                    try_run("systemctl", &["status", "--no-pager", UNIT]).unwrap_or_else(|e| e),
                    journal(&invocation)
                );
            };
            assert_eq!(request.path, format!("/v1/nodes/{NODE_ID}/metrics"));
            assert!(request.accepted(), "status {}", request.status);
            points.extend(request.points());
            let has = |group: &str| points.iter().any(|p: &MetricPoint| p.group == group);
            if ["system", "agent", "tunnel", "latency"]
                .iter()
                .all(|g| has(g))
            {
                break;
            }
        }
        let ready = probe("/readyz");
        let alive = probe("/healthz");
        let node = &self.mesh.nodes[0];
        let attached = ours(&tc_state(&node.ns, self.mesh.dev_of(0, 1)));
        let active = unit_property("ActiveState");
        drop(started);
        let journal = journal(&invocation);
        Observed {
            status,
            mountinfo,
            active,
            points,
            ready,
            alive,
            attached,
            journal,
        }
    }
}

/// What one run of the unit showed.
#[derive(Debug)]
struct Observed {
    /// `/proc/<MainPID>/status` of the agent.
    status: String,
    /// `/proc/<MainPID>/mountinfo`: the file system as the agent saw it.
    mountinfo: String,
    /// The unit's `ActiveState` while the agent ran.
    active: String,
    /// Every point of the reports read.
    points: Vec<MetricPoint>,
    /// `/readyz`: status and body.
    ready: (u16, Value),
    /// `/healthz`: status and body.
    alive: (u16, Value),
    /// The agent's TC programs on node 0's underlay veth, as `tc` lists them.
    attached: usize,
    /// The agent's log, from the journal.
    journal: String,
}

impl Observed {
    fn point<T: serde::de::DeserializeOwned>(&self, group: &str, peer: &str) -> Option<T> {
        self.points
            .iter()
            .rev()
            .find(|p| p.group == group && p.peer_id == peer)
            .map(|p| p.data.decode().expect("point data"))
    }

    fn agent(&self) -> Option<Value> {
        self.points
            .iter()
            .rev()
            .find(|p| p.group == "agent")
            .map(|p| p.data.to_value())
    }

    /// Checks that systemd ran the agent under the unit's sandbox, with `capabilities` (bits
    /// as in `/proc/<pid>/status`): without it, neither a pass nor a failure would say
    /// anything about the unit.
    fn assert_confined(&self, capabilities: u64) {
        assert_eq!(self.active, "active", "the unit while the agent ran");
        assert!(
            self.status.contains("Name:\tplexd-metrics"),
            "{}",
            self.status
        );
        let mask = |key: &str| {
            self.status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                .unwrap_or_else(|| panic!("no {key} in {}", self.status))
        };
        assert_eq!(mask("CapBnd:"), capabilities, "CapabilityBoundingSet=");
        assert_eq!(mask("CapEff:"), capabilities, "AmbientCapabilities=");
        assert_eq!(mask("CapAmb:"), capabilities, "AmbientCapabilities=");
        for line in ["NoNewPrivs:\t1", "Seccomp:\t2"] {
            assert!(self.status.contains(line), "{line}: {}", self.status);
        }
        // ProtectSystem=strict: / read-only, the state directory alone writable.
        let options = |point: &str| {
            self.mountinfo
                .lines()
                .rev()
                .map(|l| l.split(' ').collect::<Vec<_>>())
                .find(|f| f.len() > 5 && f[4] == point)
                .map(|f| f[5].to_owned())
                .unwrap_or_else(|| panic!("{point} not mounted: {}", self.mountinfo))
        };
        assert!(options("/").starts_with("ro"), "/: {}", options("/"));
        // The file system type and its options, after the " - " of a mountinfo line.
        let fs = |point: &str| {
            self.mountinfo
                .lines()
                .rev()
                .find(|l| l.split(' ').nth(4) == Some(point))
                .and_then(|l| l.split_once(" - "))
                .map(|(_, fs)| fs.to_owned())
                .unwrap_or_else(|| panic!("{point} not mounted: {}", self.mountinfo))
        };
        // ProtectProc=invisible, PrivateDevices=, PrivateTmp=.
        assert!(
            fs("/proc").contains("hidepid=invisible"),
            "/proc: {}",
            fs("/proc")
        );
        assert!(fs("/dev").starts_with("tmpfs"), "/dev: {}", fs("/dev"));
        assert!(
            self.mountinfo
                .lines()
                .any(|l| l.split(' ').nth(4) == Some("/tmp") && l.contains("systemd-private-")),
            "a private /tmp: {}",
            self.mountinfo
        );
        assert!(
            options(STATE_DIR).starts_with("rw"),
            "{STATE_DIR}: {}",
            options(STATE_DIR)
        );
    }

    /// Every expectation of the shipped unit that this run does not meet, one line each.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut expect = |ok: bool, what: String| {
            if !ok {
                problems.push(what);
            }
        };
        let (status, body) = &self.ready;
        expect(*status == 200, format!("/readyz answered {status}: {body}"));
        expect(
            body["checks"]["ebpf"]["state"] == "attached",
            format!("/readyz: kernel programs {}", body["checks"]["ebpf"]),
        );
        expect(
            body["checks"]["queue"]["kind"] == "disk"
                && body["checks"]["queue"]["dir"] == STATE_DIR,
            format!("/readyz: queue {}", body["checks"]["queue"]),
        );
        let (status, body) = &self.alive;
        expect(
            *status == 200,
            format!("/healthz answered {status}: {body}"),
        );
        expect(
            self.attached == 2,
            format!(
                "{} of the agent's TC programs on the underlay veth",
                self.attached
            ),
        );
        for group in ["system", "agent", "tunnel", "latency"] {
            expect(
                self.points.iter().any(|p| p.group == group),
                format!("no {group} point reported"),
            );
        }
        if let Some(agent) = self.agent() {
            expect(
                agent["ebpf_programs_attached"] == 2,
                format!(
                    "agent point: ebpf_programs_attached {}",
                    agent["ebpf_programs_attached"]
                ),
            );
        }
        match self.point::<TunnelStats>("tunnel", PEER) {
            Some(t) => {
                expect(
                    t.handshake_succeeded && t.rx_bytes > 0 && t.tx_bytes > 0,
                    format!("tunnel point of {PEER} without its handshake and bytes: {t:?}"),
                );
                expect(
                    t.rx_packets.is_some() && t.packet_loss_percent >= 0.0,
                    format!("tunnel point of {PEER}: loss not measured: {t:?}"),
                );
            }
            None => expect(false, format!("no tunnel point for {PEER}")),
        }
        match self.point::<LatencyResult>("latency", PEER) {
            Some(l) => expect(
                l.probes_received > 0 && l.rtt_nano > 0,
                format!("latency point of {PEER} without answers: {l:?}"),
            ),
            None => expect(false, format!("no latency point for {PEER}")),
        }
        let errors: Vec<&str> = self
            .journal
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .collect();
        expect(
            errors.is_empty(),
            format!("errors in the journal: {errors:#?}"),
        );
        problems
    }
}

/// What the agent of one invocation of the unit logged, without colour sequences.
fn journal(invocation: &str) -> String {
    // Every line written before this call is in the journal when it returns.
    run_within("journalctl", &["--sync"]);
    let text = run_within(
        "journalctl",
        &[
            &format!("_SYSTEMD_INVOCATION_ID={invocation}"),
            "--output=cat",
            "--no-pager",
        ],
    );
    strip_ansi(&text)
}

/// `GET path` of the health endpoint: status and JSON body.
fn probe(path: &str) -> (u16, Value) {
    health_probe(
        HEALTH.parse().expect("address"),
        path,
        Duration::from_secs(10),
    )
}

/// The text without terminal colour sequences (`ESC [ ... m`), which the agent's text log
/// may carry.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn the_shipped_unit_attaches_reports_every_group_and_is_healthy() {
    if !require_privileges() {
        return;
    }
    let scenario = Scenario::new();
    let seen = scenario.run(None);
    seen.assert_confined(UNIT_CAPABILITIES);
    let problems = seen.problems();
    assert!(
        problems.is_empty(),
        "under {UNIT} as shipped:\n{}\nthe agent's journal:\n{}",
        problems.join("\n"),
        seen.journal
    );
}

#[test]
fn without_bpf_or_icmp_sockets_the_same_checks_fail_and_the_agent_says_why() {
    if !require_privileges() {
        return;
    }
    let scenario = Scenario::new();
    // `~` entries take away from what the unit allows: bpf() from the system calls, raw
    // sockets (ICMP echo) from the capabilities. One run for both: the kernel programs and
    // the latency probes fail independently, and each case costs a minute of emulation.
    let seen = scenario.run(Some((
        "no-bpf-no-icmp",
        "[Service]\nSystemCallFilter=~bpf\nCapabilityBoundingSet=~CAP_NET_RAW\n\
         AmbientCapabilities=~CAP_NET_RAW\n",
    )));
    seen.assert_confined(UNIT_CAPABILITIES & !CAP_NET_RAW);
    let problems = seen.problems();
    println!("vm-figure: without bpf() and raw sockets the checks found: {problems:#?}");
    let found = |text: &str| problems.iter().any(|p| p.contains(text));
    assert!(
        found("/readyz answered 503")
            && found("/readyz: kernel programs")
            && found("agent point: ebpf_programs_attached")
            && found("0 of the agent's TC programs")
            && found("loss not measured")
            && found("latency point")
            && found("errors in the journal"),
        "without bpf() and raw sockets the shipped unit's checks must fail on the kernel \
         programs and the latency probes; they found:\n{}",
        problems.join("\n")
    );
    let reason = seen.ready.1["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the kernel programs are not attached") && reason.contains("permission"),
        "/readyz says why: {reason}"
    );
    let errors: Vec<&str> = seen
        .journal
        .lines()
        .filter(|l| l.contains(" ERROR "))
        .collect();
    assert!(
        errors.len() == 2
            && errors
                .iter()
                .any(|l| l.contains("kernel programs not attached"))
            && errors
                .iter()
                .any(|l| l.contains("latency not measured") && l.contains("CAP_NET_RAW")),
        "one error for each: {errors:#?}"
    );
    // What needs neither goes on.
    for group in ["system", "agent", "tunnel"] {
        assert!(
            !found(&format!("no {group} point")),
            "{group} is still reported: {problems:#?}"
        );
    }
}

#[test]
fn address_families_without_netlink_fail_the_same_checks() {
    if !require_privileges() {
        return;
    }
    let scenario = Scenario::new();
    // An empty assignment resets the unit's list; the next one is then the whole of it.
    let seen = scenario.run(Some((
        "no-netlink",
        "[Service]\nRestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n",
    )));
    seen.assert_confined(UNIT_CAPABILITIES);
    let problems = seen.problems();
    println!("vm-figure: without AF_NETLINK the checks found: {problems:#?}");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("tunnel point") && p.contains(PEER)),
        "kernel WireGuard is read over netlink: without it the tunnel check must fail; the \
         checks found:\n{}",
        problems.join("\n")
    );
    let said: Vec<&str> = seen
        .journal
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    println!("vm-figure: without AF_NETLINK the agent logged: {said:#?}");
    assert!(
        said.iter()
            .any(|l| l.contains("metrics: tunnel: ") && l.contains("netlink")),
        "the agent says what failed:\n{}",
        seen.journal
    );
}
