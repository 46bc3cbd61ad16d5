//! With real WireGuard: the loss the agent measures from WireGuard's own counters is exactly
//! the loss a lossy network inflicted.
//!
//! Peer A and node B run wireguard-go in their own namespaces; a router namespace between
//! them drops a random share of the transport messages to B with nftables, whose rule counter
//! is the ground truth. The probe on B's underlay measures what arrives; a probe on A's
//! underlay counts what left, so the test also checks that received + lost = sent.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plexd_metrics::source::counters::EndpointCounterSource as _;
use plexd_metrics::source::ebpf::{embedded_object, ProbeOptions, UnderlayProbe};
use plexd_metrics_tests::wg::coarse_now;
use plexd_metrics_tests::{require_privileges, run, unique_name, NetNs, VethPair};

const A_PORT: u16 = 51820;
const B_PORT: u16 = 51821;
const TUNNEL_A: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 1);
const TUNNEL_B: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 2);
const APP_PORT: u16 = 7000;
const TIMEOUT: Duration = Duration::from_millis(500);

/// A wireguard-go device in the foreground, stopped (SIGTERM) on drop so that it removes
/// its UAPI socket.
struct WireGuardGo {
    child: Child,
}

impl WireGuardGo {
    fn start(ns: &NetNs, name: &str) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "wireguard-go", "-f", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wireguard-go");
        let device = Self { child };
        // The UAPI socket appears once the device is ready for `wg set`; it is not
        // per-namespace, hence the unique names.
        let socket = PathBuf::from("/var/run/wireguard").join(format!("{name}.sock"));
        wait_until(Duration::from_secs(10), || socket.exists())
            .unwrap_or_else(|| panic!("{} never appeared", socket.display()));
        device
    }
}

impl Drop for WireGuardGo {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

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

fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let private = run("wg", &["genkey"]).expect("wg genkey");
    let path = dir.join(name);
    std::fs::write(&path, &private).expect("write private key");
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), private.as_bytes())
        .expect("write to wg pubkey");
    let out = child.wait_with_output().expect("wg pubkey");
    (
        path,
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned(),
    )
}

/// Sets up a device: key, port, one peer, tunnel address, up.
#[allow(clippy::too_many_arguments)]
fn configure(
    ns: &NetNs,
    name: &str,
    key: &Path,
    port: u16,
    peer_key: &str,
    endpoint: SocketAddr,
    address: Ipv4Addr,
    peer_address: Ipv4Addr,
) {
    ns.exec(
        "wg",
        &[
            "set",
            name,
            "private-key",
            key.to_str().expect("utf-8 path"),
            "listen-port",
            &port.to_string(),
            "peer",
            peer_key,
            "endpoint",
            &endpoint.to_string(),
            "allowed-ips",
            &format!("{peer_address}/32"),
        ],
    )
    .expect("wg set");
    ns.ip(&["addr", "add", &format!("{address}/24"), "dev", name])
        .expect("tunnel address");
    ns.ip(&["link", "set", name, "up"]).expect("link up");
}

/// Packets the router's drop rule has dropped.
fn dropped(router: &NetNs) -> u64 {
    let json = router
        .exec("nft", &["-j", "list", "chain", "inet", "loss", "forward"])
        .expect("nft list");
    let v: serde_json::Value = serde_json::from_str(&json).expect("nft JSON");
    v["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|item| item["rule"]["expr"].as_array())
        .flatten()
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum()
}

fn measured_loss_equals_the_dropped_messages(percent: u32) {
    let dir = std::env::temp_dir().join(unique_name("wgl"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let a = NetNs::new("pla").expect("namespace");
    let r = NetNs::new("plr").expect("namespace");
    let b = NetNs::new("plb").expect("namespace");
    for ns in [&a, &r, &b] {
        ns.disable_ipv6().expect("disable IPv6");
    }
    let left = VethPair::new(&a, &r).expect("veth A-R");
    let right = VethPair::new(&r, &b).expect("veth R-B");
    r.sysctl_net("ipv4/ip_forward", "1").expect("forwarding");
    a.ip(&[
        "route",
        "add",
        &format!("{}/32", right.b.addr),
        "via",
        &left.b.addr.to_string(),
    ])
    .expect("route A to B");
    b.ip(&[
        "route",
        "add",
        &format!("{}/32", left.a.addr),
        "via",
        &right.a.addr.to_string(),
    ])
    .expect("route B to A");

    // Only transport data messages (type 4) to B are dropped; handshakes always pass.
    r.exec("nft", &["add", "table", "inet", "loss"])
        .expect("nft table");
    r.exec(
        "nft",
        &[
            "add",
            "chain",
            "inet",
            "loss",
            "forward",
            "{ type filter hook forward priority 0; }",
        ],
    )
    .expect("nft chain");
    r.exec(
        "nft",
        &[
            "add",
            "rule",
            "inet",
            "loss",
            "forward",
            "udp",
            "dport",
            &B_PORT.to_string(),
            "@th,64,32",
            "0x04000000",
            "numgen",
            "random",
            "mod",
            "100",
            "lt",
            &percent.to_string(),
            "counter",
            "drop",
        ],
    )
    .expect("nft rule");

    let probe_options = ProbeOptions {
        reorder_timeout: TIMEOUT,
        ..ProbeOptions::default()
    };
    let b_probe = b
        .run(|| {
            UnderlayProbe::attach_with_options(embedded_object(), &[&right.b.name], &probe_options)
        })
        .expect("enter namespace")
        .expect("attach B's probe");
    b_probe.set_listen_ports(&[B_PORT]).expect("ports");
    let a_probe = a
        .run(|| {
            UnderlayProbe::attach_with_options(embedded_object(), &[&left.a.name], &probe_options)
        })
        .expect("enter namespace")
        .expect("attach A's probe");
    a_probe.set_listen_ports(&[A_PORT]).expect("ports");

    let (wg_a, wg_b) = (unique_name("wga"), unique_name("wgb"));
    let _dev_a = WireGuardGo::start(&a, &wg_a);
    let _dev_b = WireGuardGo::start(&b, &wg_b);
    let (key_a, pub_a) = keypair(&dir, "a.key");
    let (key_b, pub_b) = keypair(&dir, "b.key");
    let a_endpoint = SocketAddr::from((left.a.addr, A_PORT));
    let b_endpoint = SocketAddr::from((right.b.addr, B_PORT));
    configure(
        &a, &wg_a, &key_a, A_PORT, &pub_b, b_endpoint, TUNNEL_A, TUNNEL_B,
    );
    configure(
        &b, &wg_b, &key_b, B_PORT, &pub_a, a_endpoint, TUNNEL_B, TUNNEL_A,
    );

    let sink = b
        .run(|| UdpSocket::bind((TUNNEL_B, APP_PORT)))
        .expect("enter namespace")
        .expect("bind in the tunnel");
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let source = a
        .run(|| UdpSocket::bind((TUNNEL_A, 0)))
        .expect("enter namespace")
        .expect("bind in the tunnel");
    let to = SocketAddr::from((TUNNEL_B, APP_PORT));
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
    let drops = dropped(&r);
    r.exec("nft", &["flush", "chain", "inet", "loss", "forward"])
        .expect("nft flush");
    for _ in 0..20 {
        source.send_to(b"closing", to).expect("send");
    }
    wait_until(Duration::from_secs(5), || sink.recv_from(&mut buf).is_ok())
        .expect("closing traffic");
    while sink.recv_from(&mut buf).is_ok() {}

    let deadline = coarse_now() + TIMEOUT + Duration::from_millis(20);
    wait_until(Duration::from_secs(5), || coarse_now() >= deadline).expect("clock");
    let received = b_probe.read_endpoints().expect("read B").endpoints[&a_endpoint];
    let sent = a_probe.read_endpoints().expect("read A").endpoints[&b_endpoint];
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
    let _ = std::fs::remove_dir_all(dir);
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
