//! The agent on a lossy wireguard-go mesh writing to real receivers with remote write, and
//! no control plane: what Prometheus and VictoriaMetrics hold for the lossy peer equals what
//! the router dropped, a receiver that is down at first is caught up with, nothing goes to
//! stdout, and the series carry the node's name.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use plexd_metrics_tests::agent::RunningAgent;
use plexd_metrics_tests::mesh::Mesh;
use plexd_metrics_tests::prometheus::{Prometheus, Receiver};
use plexd_metrics_tests::require_privileges;

const LOSSY_PINGS: u32 = 300;
const DROP_PERCENT: u8 = 10;

fn config(dir: &Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "node_id: node-0\nmetrics:\n  collect_interval: 5s\n  report_interval: 10s\n  \
             latency:\n    enabled: false\n  remote_write:\n    url: {url}\n"
        ),
    )
    .expect("write config");
    path
}

/// The lossy peer's series as the receiver holds them.
fn selector(public_key: &str) -> String {
    format!("{{public_key=\"{public_key}\",node=\"node-0\"}}")
}

#[test]
fn prometheus_gets_the_routers_drops_after_an_outage_and_stdout_stays_empty() {
    if !require_privileges() {
        return;
    }
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let (receiver, sender) = (&mesh.nodes[0], &mesh.nodes[1]);
    let dir = std::env::temp_dir().join(format!("plexd-rw-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let listen: SocketAddr = "127.0.0.1:9090".parse().unwrap();
    let config = config(&dir, &format!("http://{listen}/api/v1/write"));

    mesh.handshake(1, 0).expect("handshake");
    let agent = RunningAgent::start(&receiver.ns, &config);
    agent.wait_for("kernel programs attached");
    let (answered, dropped) = mesh
        .lossy_echoes(1, 0, DROP_PERCENT, LOSSY_PINGS)
        .expect("lossy echoes");
    // Prometheus is not there yet: the batches wait and are retried.
    agent.wait_for("metrics report failed");
    let prometheus = Prometheus::start(
        &receiver.ns,
        listen,
        "global:\n  scrape_interval: 1m\n",
        &["--web.enable-remote-write-receiver"],
    );
    let series = selector(&sender.keys.public);
    let lost = prometheus.wait_for(
        &format!("max_over_time(plexd_peer_lost_packets_total{series}[1h])"),
        Duration::from_secs(90),
        |v| v >= dropped as f64,
    );
    assert_eq!(
        lost, dropped as f64,
        "Prometheus holds exactly the router's drops"
    );
    let received = prometheus
        .value(&format!(
            "max_over_time(plexd_peer_receive_packets_total{series}[1h])"
        ))
        .expect("received packets");
    assert!(
        received >= f64::from(answered + 8),
        "{received} received, {answered} answered"
    );
    agent.wait_for("metrics delivery recovered");
    let (code, stdout) = agent.stop();
    assert_eq!(code, Some(0));
    assert!(
        stdout.is_empty(),
        "nothing goes to stdout with remote write alone: {stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn victoria_metrics_gets_the_routers_drops() {
    if !require_privileges() {
        return;
    }
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let (receiver, sender) = (&mesh.nodes[0], &mesh.nodes[1]);
    let dir = std::env::temp_dir().join(format!("plexd-rw-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let listen: SocketAddr = "127.0.0.1:8428".parse().unwrap();
    let victoria = Receiver::victoria_metrics(&receiver.ns, listen);
    let config = config(&dir, &format!("http://{listen}/api/v1/write"));

    mesh.handshake(1, 0).expect("handshake");
    let agent = RunningAgent::start(&receiver.ns, &config);
    agent.wait_for("kernel programs attached");
    let (_, dropped) = mesh
        .lossy_echoes(1, 0, DROP_PERCENT, LOSSY_PINGS)
        .expect("lossy echoes");
    let series = selector(&sender.keys.public);
    let lost = victoria.wait_for(
        &format!("max_over_time(plexd_peer_lost_packets_total{series}[1h])"),
        Duration::from_secs(90),
        |v| v >= dropped as f64,
    );
    assert_eq!(
        lost, dropped as f64,
        "VictoriaMetrics holds exactly the router's drops"
    );
    let (code, _) = agent.stop();
    assert_eq!(code, Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
