//! The whole agent on a lossy WireGuard mesh: the `tunnel` points it reports carry exactly
//! the loss the network inflicted, with no configuration but the intervals: the underlay
//! interface comes from the route to the peer's endpoint, the listen port from the device.

use std::collections::BTreeSet;

use plexd_metrics::api::MetricPoint;
use plexd_metrics_tests::agent::RunningAgent;
use plexd_metrics_tests::mesh::Mesh;
use plexd_metrics_tests::require_privileges;

/// Echo requests from the lossy peer; about 10 % of them are dropped.
const LOSSY_PINGS: u32 = 400;
const DROP_PERCENT: u8 = 10;

#[test]
fn reported_lost_packets_equal_the_routers_drops() {
    if !require_privileges() {
        return;
    }
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let (receiver, sender) = (&mesh.nodes[0], &mesh.nodes[1]);

    let dir = std::env::temp_dir().join(format!("plexd-agent-loss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("config.yaml");
    // Latency probing is off so that the only tunnel traffic is the test's own.
    std::fs::write(
        &config,
        "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  latency:\n    enabled: false\n",
    )
    .expect("write config");

    // The handshake happens before the agent starts: a session it joins midway must not
    // count the counters it never saw as lost.
    mesh.handshake(1, 0).expect("handshake");
    assert_eq!(mesh.ping(1, 0, 3).expect("ping"), 3);
    let agent = RunningAgent::start(&receiver.ns, &config);
    let attached = agent.wait_for("kernel programs attached");
    assert!(
        attached["interfaces"]
            .as_str()
            .unwrap_or_default()
            .contains(&receiver.underlay_dev),
        "the underlay comes from the route to the peer's endpoint: {attached}"
    );

    // The session began before the programs attached, so its window starts at the first
    // counter they see; the clean echoes before the loss give it that start, and those after
    // close every hole.
    let (answered, dropped) = mesh
        .lossy_echoes(1, 0, DROP_PERCENT, LOSSY_PINGS)
        .expect("lossy echoes");

    // Two collect cycles after the traffic: the holes of the last interval are settled by
    // the collect after the one in whose interval they opened.
    agent.wait_for("collect cycle done");
    agent.wait_for("collect cycle done");
    let (code, stdout) = agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(0), "exit status after SIGTERM");

    let points: Vec<MetricPoint> = stdout
        .lines()
        .flat_map(|l| serde_json::from_str::<Vec<MetricPoint>>(l).expect("a JSON batch"))
        .filter(|p| p.group == "tunnel" && p.peer_id == sender.keys.public)
        .collect();
    assert!(points.len() >= 2, "tunnel points for the sender: {stdout}");
    let sum = |key: &str| -> u64 {
        points
            .iter()
            .map(|p| p.data.to_value()[key].as_u64().unwrap_or(0))
            .sum()
    };
    let (lost, received) = (sum("lost_packets"), sum("rx_packets"));
    assert_eq!(
        lost, dropped,
        "lost_packets over the run equal the router's drops"
    );
    assert!(
        received >= u64::from(answered),
        "{received} received, {answered} answered"
    );
    assert_eq!(sum("duplicate_packets"), 0);

    for p in &points {
        let d = p.data.to_value();
        let (lost, rx) = (
            d["lost_packets"].as_u64().unwrap(),
            d["rx_packets"].as_u64().unwrap(),
        );
        let want = if lost + rx == 0 {
            0.0
        } else {
            lost as f64 * 100.0 / (lost + rx) as f64
        };
        let got = d["packet_loss_percent"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-9,
            "packet_loss_percent {got} vs {want}: {d}"
        );
        assert_eq!(d["endpoint"], sender.endpoint().as_str());
    }
    let with_loss: BTreeSet<u64> = points
        .iter()
        .filter_map(|p| p.data.to_value()["lost_packets"].as_u64())
        .filter(|&l| l > 0)
        .collect();
    assert!(
        !with_loss.is_empty(),
        "some interval reports the loss: {points:#?}"
    );
}
