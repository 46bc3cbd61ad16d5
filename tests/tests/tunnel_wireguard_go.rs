//! The tunnel group against real wireguard-go devices in network namespaces: the device
//! reader agrees with `wg show dump`, traffic moves the counters, handshake flags follow the
//! peers' state, the agent binary reports one point per peer, and thousands of peers are read
//! completely.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use plexd_metrics::api::MetricPoint;
use plexd_metrics::collector::TunnelStats;
use plexd_metrics::config::PeerNames;
use plexd_metrics::source::tunnel::WireGuardTunnelReader;
use plexd_metrics::source::underlay::underlay_interfaces;
use plexd_metrics::source::wireguard::{listen_ports, Device, DeviceSource, SystemDevices};
use plexd_metrics_tests::agent::{run_once, OnceRun};
use plexd_metrics_tests::mesh::Mesh;
use plexd_metrics_tests::wireguard::{parse_dump, random_public_key, WireGuardGo, SOCKET_DIR};
use plexd_metrics_tests::{require_privileges, NetNs};

/// The data of the first of `points` that `pick` chooses.
fn data_of(points: &[&MetricPoint], pick: impl Fn(&MetricPoint) -> bool) -> serde_json::Value {
    points
        .iter()
        .find(|p| pick(p))
        .expect("a point of that peer")
        .data
        .to_value()
}

/// ICMP echo of ping's default 56 bytes: 84 bytes of IP, padded to 96 inside WireGuard,
/// plus 16 bytes of header and 16 of authentication tag.
const WG_BYTES_PER_PING: u64 = 128;

fn read_devices(ns: &NetNs) -> Vec<Device> {
    ns.run(|| SystemDevices::new(vec![], SOCKET_DIR).read_devices())
        .expect("enter namespace")
        .expect("read WireGuard devices")
}

fn read_stats(ns: &NetNs, reader: &WireGuardTunnelReader) -> Vec<TunnelStats> {
    ns.run(|| reader.read_blocking(SystemTime::now()))
        .expect("enter namespace")
        .expect("read tunnel stats")
}

#[test]
fn the_reader_agrees_with_wg_show_dump() {
    if !require_privileges() {
        return;
    }
    let mesh = Mesh::new(3, None).expect("build the mesh");
    let node = &mesh.nodes[0];
    let lonely = random_public_key();
    node.wg
        .wg(&[
            "set",
            &node.wg.name,
            "peer",
            &lonely,
            "allowed-ips",
            "10.220.9.9/32",
        ])
        .expect("add a peer that never answers");
    mesh.handshake(0, 1).expect("handshake");
    assert_eq!(
        mesh.ping(0, 1, 5).expect("ping"),
        5,
        "the tunnel carries traffic"
    );

    let devices = read_devices(&node.ns);
    let dump = parse_dump(&node.wg.dump().expect("wg show dump"));
    // The other nodes' sockets are in the same directory; their interfaces are not here.
    assert_eq!(devices.len(), 1, "{devices:#?}");
    let device = &devices[0];
    assert_eq!(device.name, node.wg.name);
    assert_eq!(device.listen_port, node.listen_port);
    assert_eq!(listen_ports(&devices), [node.listen_port]);
    assert_eq!(device.peers.len(), dump.len());
    assert_eq!(dump.len(), 3);
    for expected in &dump {
        let peer = device
            .peers
            .iter()
            .find(|p| p.public_key == expected.public_key)
            .unwrap_or_else(|| panic!("peer {} missing", expected.public_key));
        let endpoint = peer.endpoint.map_or("(none)".to_owned(), |e| e.to_string());
        assert_eq!(endpoint, expected.endpoint);
        let ips: Vec<String> = peer.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips.join(","), expected.allowed_ips);
        let handshake = peer.last_handshake.map_or(0, |t| {
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
        });
        assert_eq!(handshake, expected.latest_handshake);
        assert_eq!(
            (peer.rx_bytes, peer.tx_bytes),
            (expected.rx_bytes, expected.tx_bytes)
        );
    }
    let to_1 = device
        .peers
        .iter()
        .find(|p| p.public_key == mesh.nodes[1].keys.public)
        .unwrap();
    assert!(to_1.last_handshake.is_some());
    assert!(to_1.rx_bytes >= 5 * WG_BYTES_PER_PING, "{to_1:?}");
    assert_eq!(to_1.endpoint.unwrap().to_string(), mesh.nodes[1].endpoint());

    // The underlay for the kernel programs is the veth the routes to the endpoints use.
    let underlay = node
        .ns
        .run(|| underlay_interfaces(&devices, std::path::Path::new("/proc")))
        .expect("enter namespace")
        .expect("find the underlay");
    assert_eq!(underlay, std::slice::from_ref(&node.underlay_dev));
}

#[test]
fn traffic_moves_the_counters_and_handshakes_set_the_flags() {
    if !require_privileges() {
        return;
    }
    let mesh = Mesh::new(3, None).expect("build the mesh");
    let node = &mesh.nodes[0];
    let reader = WireGuardTunnelReader::new(
        Arc::new(SystemDevices::new(vec![node.wg.name.clone()], SOCKET_DIR)),
        None,
        PeerNames::Map([(mesh.nodes[1].keys.public.clone(), "node-1".to_owned())].into()),
        Duration::from_secs(180),
    );
    let before = read_stats(&node.ns, &reader);
    assert_eq!(before.len(), 2);
    for s in &before {
        assert!(!s.handshake_succeeded, "no traffic yet: {s:?}");
        assert!(s.handshake_stale, "never is stale: {s:?}");
        assert_eq!((s.rx_bytes, s.tx_bytes), (0, 0));
        assert_eq!(s.packet_loss_percent, -1.0, "eBPF off: loss not measured");
        assert_eq!(s.rx_packets, None);
    }

    mesh.handshake(0, 1).expect("handshake");
    assert_eq!(mesh.ping(0, 1, 20).expect("ping"), 20);
    let after = read_stats(&node.ns, &reader);
    let dump = parse_dump(&node.wg.dump().expect("wg show dump"));
    let named = after
        .iter()
        .find(|s| s.peer_id == "node-1")
        .expect("named peer");
    assert!(named.handshake_succeeded);
    assert!(!named.handshake_stale);
    assert_eq!(named.endpoint, mesh.nodes[1].endpoint());
    let from_dump = dump
        .iter()
        .find(|d| d.public_key == mesh.nodes[1].keys.public)
        .unwrap();
    assert_eq!(
        (named.rx_bytes, named.tx_bytes),
        (from_dump.rx_bytes, from_dump.tx_bytes)
    );
    assert!(named.tx_bytes >= 20 * WG_BYTES_PER_PING, "{named:?}");
    assert!(named.rx_bytes >= 20 * WG_BYTES_PER_PING, "{named:?}");
    let handshake = named.last_handshake_time.timestamp() as u64;
    assert_eq!(handshake, from_dump.latest_handshake);

    let silent = after
        .iter()
        .find(|s| s.peer_id == mesh.nodes[2].keys.public)
        .expect("node 2 by key");
    assert!(!silent.handshake_succeeded);
    assert!(silent.handshake_stale);
    assert_eq!(
        silent.last_handshake_time.to_rfc3339(),
        "0001-01-01T00:00:00+00:00"
    );

    // Later traffic adds to the device's counters.
    assert_eq!(mesh.ping(0, 1, 10).expect("ping"), 10);
    let later = read_stats(&node.ns, &reader);
    let again = later.iter().find(|s| s.peer_id == "node-1").unwrap();
    assert!(again.tx_bytes >= named.tx_bytes + 10 * WG_BYTES_PER_PING);
}

#[test]
fn the_agent_binary_reports_one_tunnel_point_per_peer() {
    if !require_privileges() {
        return;
    }
    let mesh = Mesh::new(3, None).expect("build the mesh");
    let node = &mesh.nodes[0];
    mesh.handshake(0, 2).expect("handshake");
    assert_eq!(mesh.ping(0, 2, 3).expect("ping"), 3);
    let config = format!(
            // 5 s: the latency probes are spread over part of one collect interval.
            "metrics:\n  collect_interval: 5s\n  ebpf:\n    enabled: false\n  wireguard:\n    peer_names:\n      {}: node-2\n",
            mesh.nodes[2].keys.public
        );
    let OnceRun { batch, stderr } = run_once(&node.ns, &config);
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("packet loss is not measured"))
        .count();
    assert_eq!(warnings, 1, "one warning at start: {stderr}");

    let tunnel: Vec<&MetricPoint> = batch.iter().filter(|p| p.group == "tunnel").collect();
    assert_eq!(tunnel.len(), 2, "one point per peer: {tunnel:#?}");
    let ids: BTreeSet<&str> = tunnel.iter().map(|p| p.peer_id.as_str()).collect();
    assert_eq!(
        ids,
        BTreeSet::from(["node-2", mesh.nodes[1].keys.public.as_str()])
    );
    for p in &tunnel {
        let d = p.data.to_value();
        assert_eq!(d["peer_id"], p.peer_id.as_str());
        assert_eq!(d["packet_loss_percent"], -1.0);
        assert!(d.get("rx_packets").is_none(), "{d}");
        for key in [
            "last_handshake_time",
            "rx_bytes",
            "tx_bytes",
            "handshake_succeeded",
            "handshake_stale",
            "endpoint",
        ] {
            assert!(d.get(key).is_some(), "{key} missing: {d}");
        }
    }
    let node2 = data_of(&tunnel, |p| p.peer_id == "node-2");
    assert_eq!(node2["handshake_succeeded"], true);
    assert_eq!(node2["handshake_stale"], false);
    assert_eq!(node2["endpoint"], mesh.nodes[2].endpoint().as_str());
    assert!(node2["tx_bytes"].as_u64().unwrap() >= 3 * WG_BYTES_PER_PING);
    // Node 1 is not pinged, but the latency group probes it from the start of the cycle,
    // which may complete a handshake before the tunnel group reads the device: either way
    // the handshake fields must agree with its time.
    let node1 = data_of(&tunnel, |p| p.peer_id != "node-2");
    let never = node1["last_handshake_time"] == "0001-01-01T00:00:00Z";
    assert_eq!(node1["handshake_succeeded"], !never, "{node1}");
    assert_eq!(node1["handshake_stale"], never, "{node1}");

    // The latency group probes the same peers, found through the same device reader and
    // named the same way, at their /32 allowed IPs, with no configured targets.
    let latency: Vec<&MetricPoint> = batch.iter().filter(|p| p.group == "latency").collect();
    let latency_ids: BTreeSet<&str> = latency.iter().map(|p| p.peer_id.as_str()).collect();
    assert_eq!(
        latency_ids, ids,
        "one latency point per device peer: {latency:#?}"
    );
    let node2 = data_of(&latency, |p| p.peer_id == "node-2");
    assert!(
        node2["rtt_nano"].as_i64().unwrap() > 0,
        "node-2 answers through the tunnel: {}",
        node2
    );
    assert_eq!(node2["probes_sent"], node2["probes_received"]);
}

#[test]
fn five_thousand_peers_are_read_completely() {
    if !require_privileges() {
        return;
    }
    const PEERS: usize = 5_000;
    let ns = NetNs::new("pwk").expect("namespace");
    let wg =
        WireGuardGo::start(&ns, &plexd_metrics_tests::unique_name("wgk")).expect("wireguard-go");
    let keys: Vec<String> = (0..PEERS).map(|_| random_public_key()).collect();
    let mut conf = String::from("[Interface]\nListenPort = 51999\n");
    for (i, key) in keys.iter().enumerate() {
        let (hi, lo) = (i / 250, i % 250 + 1);
        conf.push_str(&format!(
            "[Peer]\nPublicKey = {key}\nAllowedIPs = 10.{}.{hi}.{lo}/32\nEndpoint = 192.0.2.{lo}:{}\n",
            100 + hi / 250,
            40_000 + i
        ));
    }
    wg.setconf(&conf).expect("wg setconf");

    let devices = read_devices(&ns);
    assert_eq!(devices.len(), 1);
    let peers = &devices[0].peers;
    assert_eq!(peers.len(), PEERS, "every peer read");
    let read: BTreeSet<&str> = peers.iter().map(|p| p.public_key.as_str()).collect();
    let configured: BTreeSet<&str> = keys.iter().map(String::as_str).collect();
    assert_eq!(read, configured);
    assert!(peers
        .iter()
        .all(|p| p.endpoint.is_some() && p.allowed_ips.len() == 1));
    assert_eq!(parse_dump(&wg.dump().expect("wg show dump")).len(), PEERS);
}
