//! The wire contract, judged by Go: the agent on a wireguard-go mesh node reports to a
//! control plane written in Go with the spec's types (`tests/go/controlplane`), fetches the
//! local endpoint's token that Go's AES-256-GCM encrypted with the node's key, and sends
//! every batch to that endpoint with it. Go decodes each gzip body and names every key that
//! is missing or of the wrong type. The same run logs at debug level with a token file, a
//! fetched secret and a remote-write password, and no log line may hold any of them.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use plexd_metrics_tests::agent::RunningAgent;
use plexd_metrics_tests::control_plane::{TempDir, TestPki};
use plexd_metrics_tests::go_control_plane::{GoControlPlane, GoReport, GoSecrets};
use plexd_metrics_tests::mesh::Mesh;
use plexd_metrics_tests::require_privileges;

/// Long enough for two reports at the agent's shortest intervals (5 s / 10 s) and the
/// kernel programs' attachment.
const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn a_go_control_plane_decodes_every_group_and_its_secret_decrypts_here() {
    if !require_privileges() {
        return;
    }
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let node = &mesh.nodes[0];
    mesh.handshake(0, 1).expect("handshake");
    assert_eq!(mesh.ping(0, 1, 3).expect("ping"), 3, "the tunnel is up");

    // Secrets made for this run, so that finding one in the log cannot be a coincidence.
    let token = format!("cp-token-{:016x}", fastrand::u64(..));
    let local_token = format!("local-token-{:016x}", fastrand::u64(..));
    let write_password = format!("rw-password-{:016x}", fastrand::u64(..));
    let mut node_key = [0u8; 32];
    node_key.iter_mut().for_each(|b| *b = fastrand::u8(..));
    let node_key_hex = hex::encode(node_key);

    let dir = TempDir::new("go-cp");
    let pki = TestPki::new("go-cp");
    let server = pki.server_pem();
    let cert = dir.write("server.pem", &server.cert);
    let key = dir.write("server.key", &server.key);
    let ca = dir.write("ca.pem", pki.ca_pem());
    let go = GoControlPlane::start(
        &node.ns,
        &GoSecrets {
            node_id: "node-go",
            token: &token,
            node_key,
            secret_name: "local-metrics",
            secret: &local_token,
            remote_write: ("agent", &write_password),
        },
        &cert,
        &key,
    );
    let config = dir.write(
        "config.yaml",
        format!(
            "node_id: node-go\n\
             control_plane:\n  url: http://{cp}\n  token_file: {token_file}\n  \
             node_secret_key_file: {key_file}\n\
             metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  \
             health: {{enabled: false}}\n  \
             local_endpoint: {{url: 'https://{local}/ingest', secret_key: local-metrics, \
             ca_file: {ca}}}\n  \
             remote_write: {{url: 'http://{cp}/api/v1/write', username: agent, \
             password_file: {password_file}}}\n",
            cp = go.control_plane,
            local = go.local_endpoint,
            ca = ca.display(),
            token_file = dir.write("token", &token).display(),
            key_file = dir.write("node.key", &node_key_hex).display(),
            password_file = dir.write("password", &write_password).display(),
        ),
    );
    let agent = RunningAgent::start(&node.ns, &config);

    // Wait until both the control plane and the local endpoint have had a batch holding
    // every group of the spec, and remote write has been heard.
    let spec_groups: BTreeSet<&str> = ["agent", "latency", "system", "tunnel"].into();
    let mut complete: BTreeSet<String> = BTreeSet::new();
    let mut reports: Vec<GoReport> = Vec::new();
    let until = Instant::now() + DEADLINE;
    while !["control_plane", "local_endpoint", "secret", "remote_write"]
        .iter()
        .all(|k| complete.contains(*k))
    {
        let left = until.saturating_duration_since(Instant::now());
        let report = go.next(left);
        assert!(
            report.problems.is_empty(),
            "Go could not take the agent's {} request at {}: {:#?}",
            report.kind,
            report.path,
            report.problems
        );
        let groups: BTreeSet<&str> = report.groups.keys().map(String::as_str).collect();
        if matches!(report.kind.as_str(), "secret" | "remote_write")
            || groups.is_superset(&spec_groups)
        {
            complete.insert(report.kind.clone());
        }
        reports.push(report);
    }
    let decoded: usize = reports.iter().map(|r| r.points).sum();
    eprintln!(
        "Go decoded {decoded} points in {} requests without a problem",
        reports.len()
    );

    let (code, log) = agent.stop_with_log();
    assert_eq!(code, Some(0), "{log:#?}");
    assert!(
        log.iter().any(|l| l.contains("\"level\":\"DEBUG\"")),
        "the log was at debug level"
    );
    for (name, secret) in [
        ("the control plane token", token.as_str()),
        ("the decrypted local endpoint token", local_token.as_str()),
        ("the remote-write password", write_password.as_str()),
        ("the node secret key", node_key_hex.as_str()),
    ] {
        let leaks: Vec<&String> = log.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{name} is in the log: {leaks:#?}");
    }
}
