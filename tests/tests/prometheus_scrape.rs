//! The agent's `/metrics` scraped by a real Prometheus on a lossy wireguard-go mesh: the
//! counters Prometheus stores for the lossy peer equal what the router dropped, the
//! exposition passes `promtool check metrics`, and a scrape without the token is refused.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use plexd_metrics_tests::agent::RunningAgent;
use plexd_metrics_tests::dashboard::{dashboard, dashboard_queries, substitute};
use plexd_metrics_tests::mesh::Mesh;
use plexd_metrics_tests::prometheus::Prometheus;
use plexd_metrics_tests::prometheus_server::exchange;
use plexd_metrics_tests::require_privileges;

const LOSSY_PINGS: u32 = 300;
const DROP_PERCENT: u8 = 10;
const TOKEN: &str = "scrape-token-7f3a";

#[test]
fn prometheus_holds_the_routers_drops_and_the_token_is_required() {
    if !require_privileges() {
        return;
    }
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let (receiver, sender) = (&mesh.nodes[0], &mesh.nodes[1]);
    let dir = std::env::temp_dir().join(format!("plexd-prom-scrape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    let metrics: SocketAddr = "127.0.0.1:9103".parse().unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  latency:\n    enabled: false\n  \
             prometheus:\n    listen: {metrics}\n    token_file: {}\n",
            token_file.display()
        ),
    )
    .expect("write config");

    mesh.handshake(1, 0).expect("handshake");
    let agent = RunningAgent::start(&receiver.ns, &config);
    agent.wait_for("kernel programs attached");
    agent.wait_for("Prometheus endpoint listening (/metrics)");
    let prometheus = Prometheus::start(
        &receiver.ns,
        "127.0.0.1:9090".parse().unwrap(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: plexd\n    \
             authorization:\n      type: Bearer\n      credentials_file: {}\n    \
             static_configs:\n      - targets: ['{metrics}']\n",
            token_file.display()
        ),
        &[],
    );
    prometheus.wait_for("up{job=\"plexd\"}", Duration::from_secs(30), |v| v == 1.0);

    let (answered, dropped) = mesh
        .lossy_echoes(1, 0, DROP_PERCENT, LOSSY_PINGS)
        .expect("lossy echoes");

    let peer = format!("public_key=\"{}\"", sender.keys.public);
    // Holes are settled within two collect cycles; the scrape follows within a second.
    let lost = prometheus.wait_for(
        &format!("plexd_peer_lost_packets_total{{{peer}}}"),
        Duration::from_secs(40),
        |v| v >= dropped as f64,
    );
    assert_eq!(
        lost, dropped as f64,
        "Prometheus holds exactly the router's drops"
    );
    let received = prometheus
        .value(&format!("plexd_peer_receive_packets_total{{{peer}}}"))
        .expect("received packets");
    assert!(
        received >= f64::from(answered + 8),
        "{received} received, {answered} answered"
    );
    let bytes = prometheus
        .value(&format!("plexd_peer_receive_bytes_total{{{peer}}}"))
        .expect("received bytes");
    assert!(bytes > 0.0);
    assert_eq!(
        prometheus.value(&format!(
            "plexd_peer_up{{{peer},interface=\"{}\"}}",
            receiver.wg.name
        )),
        Some(1.0)
    );
    // The dashboard's panels on what this Prometheus holds: every query runs, and the loss
    // panels show the lossy peer's loss.
    let board = dashboard();
    for (title, expr) in dashboard_queries(&board) {
        let result = prometheus.query(&substitute(&expr));
        if title.contains("loss") {
            let lossy = result
                .iter()
                .find(|r| r["metric"]["peer"] == sender.keys.public.as_str())
                .unwrap_or_else(|| panic!("{title}: no series of the lossy peer: {result:?}"));
            let value: f64 = lossy["value"][1].as_str().unwrap().parse().unwrap();
            assert!(value > 0.0, "{title}: {lossy}");
        }
    }
    let version = prometheus.query("plexd_agent_build_info");
    assert_eq!(
        version[0]["metric"]["version"],
        env!("CARGO_PKG_VERSION"),
        "{version:?}"
    );

    // Without the token, or with another: refused.
    let get = |auth: &str| {
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n{auth}\r\n");
        receiver
            .ns
            .run(move || exchange(metrics, request.as_bytes()))
            .expect("enter the namespace")
            .expect("GET /metrics")
    };
    assert_eq!(get("").0, 401);
    assert_eq!(get("Authorization: Bearer nope\r\n").0, 401);
    let (status, text) = get(&format!("Authorization: Bearer {TOKEN}\r\n"));
    assert_eq!(status, 200);
    // What promtool (Prometheus' own linter) says of the exposition.
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by cargo xtask setup");
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _) = agent.stop();
    assert_eq!(code, Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prometheus_scrapes_over_https_with_the_agents_certificate() {
    if !require_privileges() {
        return;
    }
    let ns = plexd_metrics_tests::NetNs::new("pms").expect("namespace");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    let pki = plexd_metrics_tests::control_plane::TestPki::new("metrics");
    let server = pki.server_pem();
    let dir = std::env::temp_dir().join(format!("plexd-prom-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert, key, ca) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
    std::fs::write(&cert, &server.cert).unwrap();
    std::fs::write(&key, &server.key).unwrap();
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let metrics: SocketAddr = "127.0.0.1:9103".parse().unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  ebpf: {{ enabled: false }}\n  \
             latency: {{ enabled: false }}\n  wireguard: {{ enabled: false }}\n  \
             prometheus:\n    listen: {metrics}\n    cert_file: {}\n    key_file: {}\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let agent = RunningAgent::start(&ns, &config);
    agent.wait_for("Prometheus endpoint listening (/metrics)");
    let prometheus = Prometheus::start(
        &ns,
        "127.0.0.1:9090".parse().unwrap(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: plexd\n    \
             scheme: https\n    tls_config:\n      ca_file: {}\n    \
             static_configs:\n      - targets: ['{metrics}']\n",
            ca.display()
        ),
        &[],
    );
    prometheus.wait_for("up{job=\"plexd\"}", Duration::from_secs(30), |v| v == 1.0);
    // The node's memory as the kernel states it, after the agent's first collect.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    let total = prometheus.wait_for(
        "plexd_node_memory_total_bytes",
        Duration::from_secs(30),
        |v| v > 0.0,
    );
    assert_eq!(total, total_kib * 1024.0);
    // Plain HTTP to the TLS port gets no metrics.
    let plain = ns
        .run(move || exchange(metrics, b"GET /metrics HTTP/1.0\r\n\r\n"))
        .expect("namespace");
    assert!(!matches!(plain, Ok((200, _))), "{plain:?}");
    let (code, _) = agent.stop();
    assert_eq!(code, Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
