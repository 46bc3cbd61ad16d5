//! `cargo xtask run --demo`: a throw-away mesh of three wireguard-go nodes with a lossy link
//! between node 0 and node 1, the agent running in node 0's namespace, and its tunnel group
//! shown live as a table. Ctrl-C stops the agent (which flushes and detaches) and removes
//! the mesh.

use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::signal::{SigHandler, Signal};
use plexd_metrics::api::MetricPoint;
use plexd_metrics_tests::mesh::Mesh;

/// Percent of node 0 ↔ node 1 packets the router drops.
const LOSS_PERCENT: u8 = 5;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// A helper process that is stopped when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let agent = match std::env::args().skip_while(|a| a != "--agent").nth(1) {
        Some(path) => PathBuf::from(path),
        None => {
            eprintln!("usage: demo --agent PATH (run it through `cargo xtask run --demo`)");
            std::process::exit(2);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("demo: needs root (network namespaces, wireguard-go, eBPF)");
        std::process::exit(2);
    }
    // Ctrl-C reaches the whole process group: the agent flushes and exits, and this
    // process must live on to tear the mesh down.
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { nix::sys::signal::signal(signal, SigHandler::Handler(on_signal)) }
        {
            eprintln!("demo: cannot handle {signal}: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = run(&agent) {
        eprintln!("demo: {e}");
        std::process::exit(1);
    }
}

fn run(agent: &std::path::Path) -> std::io::Result<()> {
    eprintln!("demo: building a mesh of three wireguard-go nodes behind a router namespace...");
    let mesh = Mesh::new(3, Some(5))?;
    let _loss = [
        mesh.drop_between(0, 1, LOSS_PERCENT, false)?,
        mesh.drop_between(1, 0, LOSS_PERCENT, false)?,
    ];
    let node = &mesh.nodes[0];
    let dir = std::env::temp_dir().join(format!("plexd-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  ebpf:\n    interfaces: [{}]\n  wireguard:\n    interfaces: [{}]\n    peer_names:\n      {}: node-1-lossy\n      {}: node-2\n",
            node.underlay_dev, node.wg.name, mesh.nodes[1].keys.public, mesh.nodes[2].keys.public
        ),
    )?;
    let log = dir.join("agent.log");

    // Steady traffic from node 0 to both peers, 20 packets a second each.
    let pingers: Vec<Background> = [1, 2]
        .iter()
        .map(|&to| {
            Command::new("ip")
                .args(["netns", "exec", node.ns.name(), "ping", "-q", "-i", "0.05"])
                .arg(mesh.nodes[to].tunnel.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map(Background)
        })
        .collect::<Result<_, _>>()?;

    let mut child = Command::new("ip")
        .args(["netns", "exec", node.ns.name()])
        .arg(agent)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    eprintln!(
        "demo: agent running in {} (log: {}); first report in 10 s; Ctrl-C to stop",
        node.ns.name(),
        log.display()
    );
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Vec<MetricPoint>>(&line) {
            Ok(batch) => show(&batch, &log),
            Err(e) => eprintln!("demo: agent printed something else ({e}): {line}"),
        }
        if STOP.load(Ordering::SeqCst) {
            break;
        }
    }
    // The agent got Ctrl-C too; make sure it is gone before the mesh is.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = child.wait()?;
    drop(pingers);
    eprintln!("demo: agent exited ({status}); removing the mesh");
    drop(_loss);
    drop(mesh);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("demo: done, nothing left behind");
    Ok(())
}

/// One screen: the latest tunnel point per peer, as a table.
fn show(batch: &[MetricPoint], log: &std::path::Path) {
    let Some(latest) = batch
        .iter()
        .filter(|p| p.group == "tunnel")
        .map(|p| p.timestamp)
        .max()
    else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut out = String::from("\x1b[2J\x1b[H");
    out.push_str(&format!(
        "plexd-metrics demo: tunnel group of node 0 at {} (agent log: {})\n\n",
        latest.format("%H:%M:%S UTC"),
        log.display()
    ));
    out.push_str(&format!(
        "{:<14} {:<20} {:>10} {:>12} {:>12} {:>8} {:>8} {:>6} {:>6}\n",
        "peer",
        "endpoint",
        "handshake",
        "rx bytes",
        "tx bytes",
        "rx pkts",
        "lost",
        "late",
        "loss %"
    ));
    for p in batch
        .iter()
        .filter(|p| p.group == "tunnel" && p.timestamp == latest)
    {
        let d = p.data.to_value();
        let count = |key: &str| d[key].as_u64().map_or("-".to_owned(), |n| n.to_string());
        let handshake = if d["handshake_succeeded"] == true {
            let at = chrono_seconds(d["last_handshake_time"].as_str().unwrap_or_default());
            format!("{}s ago", now - at)
        } else {
            "never".to_owned()
        };
        let loss = match d["packet_loss_percent"].as_f64() {
            Some(l) if l >= 0.0 => format!("{l:.1}"),
            _ => "n/a".to_owned(),
        };
        out.push_str(&format!(
            "{:<14} {:<20} {:>10} {:>12} {:>12} {:>8} {:>8} {:>6} {:>6}\n",
            p.peer_id,
            d["endpoint"].as_str().unwrap_or(""),
            handshake,
            count("rx_bytes"),
            count("tx_bytes"),
            count("rx_packets"),
            count("lost_packets"),
            count("late_packets"),
            loss,
        ));
    }
    out.push_str(&format!(
        "\nthe router drops {LOSS_PERCENT} % of node 0 <-> node-1-lossy; loss % n/a means the \
         kernel programs do not measure it (see the agent log)\n"
    ));
    let _ = std::io::stdout().write_all(out.as_bytes());
    let _ = std::io::stdout().flush();
}

/// Seconds since the epoch of an RFC 3339 time such as `2026-02-12T10:29:55Z`.
fn chrono_seconds(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text).map_or(0, |t| t.timestamp())
}
