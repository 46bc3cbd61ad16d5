//! With real WireGuard: the loss the agent measures from WireGuard's own counters is exactly
//! the loss a lossy network inflicted.
//!
//! Peer A (node 0) and node B (node 1) of a wireguard-go [`Mesh`]; the router namespace
//! between them drops a random share of the transport messages to B with nftables, whose
//! rule counter is the ground truth. The probe on B's underlay measures what arrives; a probe
//! on A's underlay counts what left, so the test also checks that received + lost = sent.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use plexd_metrics::source::counters::EndpointCounterSource as _;
use plexd_metrics::source::ebpf::{ProbeOptions, UnderlayProbe};
use plexd_metrics_tests::mesh::{Mesh, MeshNode};
use plexd_metrics_tests::wg::coarse_now;
use plexd_metrics_tests::{attach_probe, require_privileges};

const APP_PORT: u16 = 7000;
const TIMEOUT: Duration = Duration::from_millis(500);
const A: usize = 0;
const B: usize = 1;

/// Polls `ready` until it holds or `limit` passes; `None` on timeout.
fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> Option<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The kernel programs on a node's underlay, watching its listen port.
fn probe(node: &MeshNode) -> UnderlayProbe {
    let options = ProbeOptions {
        reorder_timeout: TIMEOUT,
        ..ProbeOptions::default()
    };
    attach_probe(&node.ns, &node.underlay_dev, &options, &[node.listen_port])
}

fn underlay_endpoint(node: &MeshNode) -> SocketAddr {
    SocketAddr::from((node.underlay, node.listen_port))
}

fn measured_loss_equals_the_dropped_messages(percent: u8) {
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let (a, b) = (&mesh.nodes[A], &mesh.nodes[B]);
    // Only transport data messages to B are dropped; handshakes always pass.
    let rule = mesh
        .drop_between(A, B, percent, true)
        .expect("the drop rule");
    let b_probe = probe(b);
    let a_probe = probe(a);

    let sink =
        b.ns.run(|| UdpSocket::bind((b.tunnel, APP_PORT)))
            .expect("enter namespace")
            .expect("bind in the tunnel");
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let source =
        a.ns.run(|| UdpSocket::bind((a.tunnel, 0)))
            .expect("enter namespace")
            .expect("bind in the tunnel");
    let to = SocketAddr::from((b.tunnel, APP_PORT));
    let mut buf = [0u8; 2048];
    // Until the handshake is done the first datagrams wait in wireguard-go (or are lost on
    // the way); one that arrives shows the tunnel is up.
    wait_until(Duration::from_secs(20), || {
        source.send_to(b"hello", to).expect("send");
        sink.recv_from(&mut buf).is_ok()
    })
    .expect("the tunnel comes up");

    // The measured traffic, in bursts that the receiver drains, so that nothing but the
    // router's rule loses packets.
    for burst in 0..80u32 {
        for i in 0..50u32 {
            let payload = format!("{burst}:{i}:{}", "x".repeat((i as usize * 37) % 900));
            source.send_to(payload.as_bytes(), to).expect("send");
        }
        while sink.recv_from(&mut buf).is_ok() {}
    }
    // Stop dropping and send a little more, so that every lost message has a later one
    // behind it: loss after the last delivered message is invisible to any receiver.
    let drops = rule.dropped().expect("the rule's counter");
    drop(rule);
    for _ in 0..20 {
        source.send_to(b"closing", to).expect("send");
    }
    wait_until(Duration::from_secs(5), || sink.recv_from(&mut buf).is_ok())
        .expect("closing traffic");
    while sink.recv_from(&mut buf).is_ok() {}

    let deadline = coarse_now() + TIMEOUT + Duration::from_millis(20);
    wait_until(Duration::from_secs(5), || coarse_now() >= deadline).expect("clock");
    let received = b_probe.read_endpoints().expect("read B").endpoints[&underlay_endpoint(a)];
    let sent = a_probe.read_endpoints().expect("read A").endpoints[&underlay_endpoint(b)];
    eprintln!(
        "{percent} %: sent {}, received {}, lost {} (dropped {drops}), late {}, duplicate {}",
        sent.tx_packets, received.rx_packets, received.lost, received.late, received.duplicate
    );
    assert_eq!(received.lost, drops, "{received:?}");
    assert_eq!(received.rx_packets + received.lost, sent.tx_packets);
    let measured = received.lost as f64 / (received.rx_packets + received.lost) as f64 * 100.0;
    let inflicted = drops as f64 / sent.tx_packets as f64 * 100.0;
    assert!(
        (measured - inflicted).abs() < 1e-9,
        "{measured} vs {inflicted}"
    );
    if percent > 0 {
        assert!(drops > 0, "the rule dropped nothing at {percent} %");
    }
    assert_eq!(received.duplicate, 0);
}

#[test]
fn no_loss_on_a_clean_link() {
    if !require_privileges() {
        return;
    }
    measured_loss_equals_the_dropped_messages(0);
}

#[test]
fn two_percent_random_loss() {
    if !require_privileges() {
        return;
    }
    measured_loss_equals_the_dropped_messages(2);
}

#[test]
fn ten_percent_random_loss() {
    if !require_privileges() {
        return;
    }
    measured_loss_equals_the_dropped_messages(10);
}
