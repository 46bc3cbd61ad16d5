//! The `latency` group over a real wireguard-go mesh: the peers come from the WireGuard
//! device (read with `wg show dump` here; the agent's own device reader replaces that adapter
//! when it lands), each is probed at its first single-host allowed IP through the tunnel
//! interface, a peer whose tunnel cannot come up gets -1, and a peer without a single-host
//! allowed IP is skipped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use plexd_metrics::collector::{BoxError, Collector, LatencyCollector, LatencySettings};
use plexd_metrics::source::icmp::{IcmpOptions, IcmpPinger, SocketChoice};
use plexd_metrics::source::peers::{AllowedIp, DevicePeer, DevicePeers, MeshPeers, MeshPinger};
use plexd_metrics_tests::{
    quiet_namespaces, require_privileges, run, unique_name, NetNs, VethPair,
};
use tokio_util::sync::CancellationToken;

/// A wireguard-go interface inside a namespace, with its keys. wireguard-go runs in the
/// foreground as this test's child, so that dropping this ends it (and with it the TUN
/// device, which would otherwise keep the namespace alive).
struct WgInterface {
    name: String,
    public_key: String,
    private_key_file: std::path::PathBuf,
    process: std::process::Child,
}

impl WgInterface {
    fn new(ns: &NetNs, address: &str, port: u16) -> Self {
        // The UAPI socket's path is not per-namespace: the name must be unique machine-wide.
        let name = unique_name("wg");
        let mut process = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "wireguard-go", "-f", &name])
            .env("LOG_LEVEL", "verbose")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start wireguard-go");
        // Ready once it says its UAPI socket listens; the rest of its log is drained.
        let mut lines = BufReader::new(process.stdout.take().expect("piped stdout")).lines();
        loop {
            let line = lines
                .next()
                .expect("wireguard-go exited before its UAPI listener started")
                .expect("read wireguard-go's log");
            if line.contains("UAPI listener started") {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        let private = run("wg", &["genkey"]).expect("wg genkey");
        let public = pipe("wg", &["pubkey"], &private);
        let private_key_file = std::env::temp_dir().join(format!("{name}.key"));
        std::fs::write(&private_key_file, private.trim()).expect("write key");
        ns.exec(
            "wg",
            &[
                "set",
                &name,
                "private-key",
                private_key_file.to_str().expect("UTF-8"),
                "listen-port",
                &port.to_string(),
            ],
        )
        .expect("wg set");
        ns.ip(&["addr", "add", address, "dev", &name])
            .expect("address");
        ns.ip(&["link", "set", &name, "up"]).expect("link up");
        Self {
            name,
            public_key: public.trim().to_owned(),
            private_key_file,
            process,
        }
    }

    fn add_peer(&self, ns: &NetNs, public_key: &str, endpoint: &str, allowed: &str) {
        ns.exec(
            "wg",
            &[
                "set",
                &self.name,
                "peer",
                public_key,
                "endpoint",
                endpoint,
                "allowed-ips",
                allowed,
            ],
        )
        .expect("wg set peer");
    }
}

impl Drop for WgInterface {
    fn drop(&mut self) {
        // SIGTERM lets wireguard-go remove its UAPI socket and TUN device itself.
        let pid = nix::unistd::Pid::from_raw(self.process.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
            let _ = self.process.kill();
        }
        let _ = self.process.wait();
        let _ = std::fs::remove_file(&self.private_key_file);
    }
}

fn pipe(program: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{program} failed");
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The device's peers from `wg show <if> dump`, named by public key.
struct WgShow {
    ns_name: String,
    interface: String,
}

#[async_trait]
impl DevicePeers for WgShow {
    async fn device_peers(&self, _: &CancellationToken) -> Result<Vec<DevicePeer>, BoxError> {
        let dump = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns_name,
                "wg",
                "show",
                &self.interface,
                "dump",
            ],
        )?;
        // The first line is the interface; each peer line is: public key, preshared key,
        // endpoint, allowed IPs, latest handshake, rx, tx, keepalive.
        let mut peers = Vec::new();
        for line in dump.lines().skip(1) {
            let fields: Vec<&str> = line.split('\t').collect();
            let allowed_ips = fields[3]
                .split(',')
                .filter_map(|a| {
                    let (addr, len) = a.split_once('/')?;
                    Some(AllowedIp {
                        addr: addr.parse().ok()?,
                        prefix_len: len.parse().ok()?,
                    })
                })
                .collect();
            peers.push(DevicePeer {
                peer_id: fields[0].to_owned(),
                public_key: fields[0].to_owned(),
                allowed_ips,
            });
        }
        Ok(peers)
    }
}

#[test]
fn every_wireguard_peer_gets_an_rtt_a_down_one_gets_minus_one_and_one_without_address_is_skipped() {
    if !require_privileges() {
        return;
    }
    let (a, b) = quiet_namespaces();
    let veth = VethPair::new(&a, &b).expect("veth pair");
    let wg_a = WgInterface::new(&a, "10.100.0.1/24", 51820);
    let wg_b = WgInterface::new(&b, "10.100.0.2/24", 51821);
    // B is reachable; "down" has an endpoint where nothing listens, so its tunnel never comes
    // up; "net" routes a whole prefix and has no mesh address of its own.
    wg_a.add_peer(
        &a,
        &wg_b.public_key,
        &format!("{}:51821", veth.b.addr),
        "10.100.0.2/32",
    );
    let down_key = pipe("wg", &["pubkey"], &run("wg", &["genkey"]).expect("genkey"));
    let down_key = down_key.trim();
    wg_a.add_peer(&a, down_key, &format!("{}:9", veth.b.addr), "10.100.0.3/32");
    let net_key = pipe("wg", &["pubkey"], &run("wg", &["genkey"]).expect("genkey"));
    let net_key = net_key.trim();
    wg_a.add_peer(&a, net_key, &format!("{}:9", veth.b.addr), "10.50.0.0/24");
    wg_b.add_peer(
        &b,
        &wg_a.public_key,
        &format!("{}:51820", veth.a.addr),
        "10.100.0.1/32",
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let options = IcmpOptions {
        interface: Some(wg_a.name.clone()),
        socket: SocketChoice::Auto,
    };
    let icmp = a
        .run(|| {
            let _entered = rt.enter();
            IcmpPinger::open(&options)
        })
        .expect("enter namespace")
        .expect("open pinger on the WireGuard interface");
    let device = Arc::new(WgShow {
        ns_name: a.name().to_owned(),
        interface: wg_a.name.clone(),
    });
    let peers = Arc::new(MeshPeers::new(Some(device), BTreeMap::new()));
    let pinger = Arc::new(MeshPinger::new(peers.clone(), icmp));
    let settings = LatencySettings {
        probes: 3,
        timeout: Duration::from_secs(1),
        spread: Duration::from_millis(600),
        collect_interval: Duration::from_secs(15),
    };
    let collector = LatencyCollector::new(pinger, peers.clone(), settings);
    let start = Instant::now();
    let points = rt
        .block_on(collector.collect(
            plexd_metrics::collector::Cycle::default(),
            &CancellationToken::new(),
        ))
        .expect("collect");
    let took = start.elapsed();

    let by_peer: BTreeMap<&str, serde_json::Value> = points
        .iter()
        .map(|p| (p.peer_id.as_str(), p.data.to_value()))
        .collect();
    let mut want = vec![wg_b.public_key.as_str(), down_key];
    want.sort_unstable();
    assert_eq!(
        by_peer.keys().copied().collect::<Vec<_>>(),
        want,
        "the peer without a single-host allowed IP is skipped"
    );
    assert_eq!(
        peers.address_of(&wg_b.public_key),
        Some("10.100.0.2".parse::<IpAddr>().unwrap())
    );
    let up = &by_peer[wg_b.public_key.as_str()];
    assert!(up["rtt_nano"].as_i64().unwrap() > 0, "{up}");
    // The first probe may have waited for the handshake; every probe still got its reply.
    assert_eq!(up["probes_received"], 3, "{up}");
    let down = &by_peer[down_key];
    assert_eq!(down["rtt_nano"], -1, "{down}");
    assert_eq!(down["probes_received"], 0, "{down}");
    // The down peer costs no more than the last probe's timeout after the spread.
    assert!(
        took < settings.spread + settings.timeout + Duration::from_millis(300),
        "{took:?}"
    );
}
