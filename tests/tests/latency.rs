//! The `latency` group against real sockets: a pinger namespace probing addresses in a target
//! namespace over a veth pair (the stand-in for the mesh interface), through unprivileged
//! datagram sockets and raw sockets, IPv4 and IPv6, with ICMP errors, silence, stray and
//! duplicate replies, another pinger running at the same time, and fping as the reference.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexd_metrics::api::MetricPoint;
use plexd_metrics::collector::{Collector, LatencyCollector, LatencySettings};
use plexd_metrics::source::icmp::{IcmpError, IcmpOptions, IcmpPinger, SocketChoice, SocketKind};
use plexd_metrics::source::peers::{MeshPeers, MeshPinger};
use plexd_metrics_tests::agent::{run_once, OnceRun};
use plexd_metrics_tests::require_privileges;
use plexd_metrics_tests::targets::{
    TargetNet, V4_SILENT, V4_UNREACHABLE, V6_SILENT, V6_UNREACHABLE,
};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Opens the pinger inside the pinger namespace, bound to the veth (the "mesh interface").
fn open(net: &TargetNet, rt: &Runtime, socket: SocketChoice) -> Result<IcmpPinger, IcmpError> {
    let options = IcmpOptions {
        interface: Some(net.link.clone()),
        socket,
    };
    net.pinger
        .run(|| {
            let _entered = rt.enter();
            IcmpPinger::open(&options)
        })
        .expect("enter the pinger namespace")
}

/// A latency collector over `pinger` for `targets` (name → address).
fn collector(
    pinger: IcmpPinger,
    targets: &[(String, IpAddr)],
    probes: u32,
    spread: Duration,
) -> (
    LatencyCollector<Arc<MeshPinger>, Arc<MeshPeers>>,
    Arc<MeshPinger>,
) {
    let peers = Arc::new(MeshPeers::new(
        None,
        targets.iter().cloned().collect::<BTreeMap<_, _>>(),
    ));
    let mesh = Arc::new(MeshPinger::new(peers.clone(), pinger));
    let settings = LatencySettings {
        probes,
        timeout: Duration::from_secs(1),
        spread,
        collect_interval: Duration::from_secs(15),
    };
    (LatencyCollector::new(mesh.clone(), peers, settings), mesh)
}

fn named(addresses: &[IpAddr]) -> Vec<(String, IpAddr)> {
    addresses
        .iter()
        .map(|a| (format!("peer-{a}"), *a))
        .collect()
}

fn field(p: &MetricPoint, key: &str) -> i64 {
    p.data.to_value()[key]
        .as_i64()
        .unwrap_or_else(|| panic!("{key} missing in {}", p.data))
}

fn every_target_answers(allow_datagram: bool, want: SocketKind) {
    let net = TargetNet::new(16, 16).expect("target network");
    net.allow_datagram_sockets(allow_datagram).expect("sysctl");
    let rt = runtime();
    let pinger = open(&net, &rt, SocketChoice::Auto).expect("open pinger");
    assert_eq!(pinger.socket_kind(false), Some(want));
    assert_eq!(pinger.socket_kind(true), Some(want));

    let targets = named(&net.addresses);
    let (c, mesh) = collector(pinger, &targets, 3, Duration::from_millis(300));
    let points = rt
        .block_on(c.collect(
            plexd_metrics::collector::Cycle::default(),
            &CancellationToken::new(),
        ))
        .expect("collect");
    let mut got: Vec<&str> = points.iter().map(|p| p.peer_id.as_str()).collect();
    let mut want: Vec<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "one point per target");
    for p in &points {
        let name = &p.peer_id;
        assert_eq!(p.group, "latency");
        let rtt = field(p, "rtt_nano");
        assert!(rtt > 0 && rtt < 50_000_000, "{name}: {}", p.data);
        assert!(field(p, "rtt_min_nano") <= rtt && rtt <= field(p, "rtt_max_nano"));
        assert!(field(p, "rtt_jitter_nano") >= 0);
        assert_eq!(
            (field(p, "probes_sent"), field(p, "probes_received")),
            (3, 3)
        );
    }
    let stats = mesh.icmp().stats();
    assert_eq!(stats.replies, 3 * targets.len() as u64, "{stats:?}");
    assert_eq!(stats.late_or_duplicate, 0, "{stats:?}");
}

#[test]
fn every_ipv4_and_ipv6_target_gets_an_rtt_over_datagram_sockets() {
    if !require_privileges() {
        return;
    }
    every_target_answers(true, SocketKind::Datagram);
}

#[test]
fn every_ipv4_and_ipv6_target_gets_an_rtt_over_raw_sockets() {
    if !require_privileges() {
        return;
    }
    every_target_answers(false, SocketKind::Raw);
}

#[test]
fn a_forbidden_datagram_socket_is_explained() {
    if !require_privileges() {
        return;
    }
    let net = TargetNet::new(0, 0).expect("target network");
    net.allow_datagram_sockets(false).expect("sysctl");
    let rt = runtime();
    let err = open(&net, &rt, SocketChoice::Datagram)
        .err()
        .expect("datagram sockets are forbidden");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot open an ICMP socket bound to {}: datagram: the agent's group is outside net.ipv4.ping_group_range",
            net.link
        )),
        "{text}"
    );
    assert!(text.contains("CAP_NET_RAW"), "{text}");

    let err = open(
        &TargetNet {
            link: "nosuch0".into(),
            ..TargetNet::new(0, 0).expect("target network")
        },
        &rt,
        SocketChoice::Auto,
    )
    .err()
    .expect("no such interface");
    assert!(
        err.to_string().starts_with(
            "cannot bind the ICMP socket to interface \"nosuch0\": ENODEV: No such device; set metrics.latency.interface"
        ),
        "{err}"
    );
}

/// An ICMP error ends the probe at once; silence ends it at the caller's timeout.
fn errors_end_probes_at_once(allow_datagram: bool, want: SocketKind) {
    let net = TargetNet::new(1, 1).expect("target network");
    net.allow_datagram_sockets(allow_datagram).expect("sysctl");
    let rt = runtime();
    let pinger = open(&net, &rt, SocketChoice::Auto).expect("open pinger");
    assert_eq!(pinger.socket_kind(false), Some(want));
    let timeout = Duration::from_secs(2);
    rt.block_on(async {
        for addr in [IpAddr::V4(V4_UNREACHABLE), IpAddr::V6(V6_UNREACHABLE)] {
            let start = Instant::now();
            let outcome = tokio::time::timeout(timeout, pinger.probe(addr))
                .await
                .expect("an ICMP error arrives well before the timeout");
            let took = start.elapsed();
            match outcome {
                Err(IcmpError::Unreachable { addr: to, from, .. }) => {
                    assert_eq!(to, addr);
                    let router: IpAddr = if addr.is_ipv4() {
                        "10.202.0.2".parse().unwrap()
                    } else {
                        "fd02::2".parse().unwrap()
                    };
                    assert_eq!(from, router);
                }
                other => panic!("{addr}: expected unreachable, got {other:?}"),
            }
            assert!(took < Duration::from_millis(200), "{addr}: {took:?}");
        }
        for addr in [IpAddr::V4(V4_SILENT), IpAddr::V6(V6_SILENT)] {
            let start = Instant::now();
            let outcome =
                tokio::time::timeout(Duration::from_millis(300), pinger.probe(addr)).await;
            assert!(outcome.is_err(), "{addr}: {outcome:?}");
            assert!(start.elapsed() >= Duration::from_millis(300));
        }
        // Answered probes still work after errors and timeouts, and nothing stays waiting.
        for addr in &net.addresses {
            pinger.probe(*addr).await.expect("a target answers");
        }
    });
    let stats = pinger.stats();
    assert_eq!((stats.errors, stats.replies), (2, 2), "{stats:?}");
    assert_eq!(pinger.in_flight(), 0);
}

#[test]
fn icmp_errors_end_probes_at_once_over_datagram_sockets() {
    if !require_privileges() {
        return;
    }
    errors_end_probes_at_once(true, SocketKind::Datagram);
}

#[test]
fn icmp_errors_end_probes_at_once_over_raw_sockets() {
    if !require_privileges() {
        return;
    }
    errors_end_probes_at_once(false, SocketKind::Raw);
}

#[test]
fn an_unreachable_peer_gets_minus_one_quickly_and_the_others_are_measured() {
    if !require_privileges() {
        return;
    }
    let net = TargetNet::new(2, 0).expect("target network");
    let rt = runtime();
    let pinger = open(&net, &rt, SocketChoice::Auto).expect("open pinger");
    let mut targets = named(&net.addresses);
    targets.push(("down".into(), IpAddr::V4(V4_UNREACHABLE)));
    // One probe each, all sent at once: the cycle lasts as long as its slowest probe.
    let (c, _) = collector(pinger, &targets, 1, Duration::ZERO);
    let start = Instant::now();
    let points = rt
        .block_on(c.collect(
            plexd_metrics::collector::Cycle::default(),
            &CancellationToken::new(),
        ))
        .expect("collect");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "the unreachable peer did not wait for the 1 s timeout: {:?}",
        start.elapsed()
    );
    let down = points
        .iter()
        .find(|p| p.peer_id == "down")
        .expect("a point for the down peer");
    assert_eq!(field(down, "rtt_nano"), -1);
    assert_eq!(
        (field(down, "probes_sent"), field(down, "probes_received")),
        (1, 0)
    );
    assert!(points
        .iter()
        .filter(|p| p.peer_id != "down")
        .all(|p| field(p, "rtt_nano") > 0));
}

/// A raw socket in the target namespace that answers every echo request a second time, and
/// once more with a forged cookie: duplicates and strays for the pinger to ignore.
struct Echoer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Echoer {
    fn start(net: &TargetNet) -> Self {
        use nix::sys::socket::{
            recvfrom, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag,
            SockProtocol, SockType, SockaddrIn,
        };
        let fd = net
            .target
            .run(|| {
                socket(
                    AddressFamily::Inet,
                    SockType::Raw,
                    SockFlag::SOCK_CLOEXEC,
                    SockProtocol::Icmp,
                )
            })
            .expect("enter target namespace")
            .expect("raw socket");
        // The loop below checks `stop` when a receive times out.
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 50_000),
        )
        .expect("receive timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                use std::os::fd::AsRawFd;
                let mut echoed = 0;
                let mut buf = [0u8; 1500];
                loop {
                    // Stops at the first timeout after being told to, so that requests already
                    // queued (the pinger sends in bursts) are all answered and counted.
                    let Ok((n, Some(from))) = recvfrom::<SockaddrIn>(fd.as_raw_fd(), &mut buf)
                    else {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        continue;
                    };
                    let header = usize::from(buf[0] & 0x0f) * 4;
                    let icmp = &buf[header..n];
                    if icmp.len() < 8 || icmp[0] != 8 {
                        continue;
                    }
                    let mut reply = icmp.to_vec();
                    reply[0] = 0;
                    set_checksum(&mut reply);
                    let _ = sendto(fd.as_raw_fd(), &reply, &from, MsgFlags::empty());
                    if reply.len() >= 16 {
                        reply[8] ^= 0xff; // not the pinger's cookie
                        set_checksum(&mut reply);
                        let _ = sendto(fd.as_raw_fd(), &reply, &from, MsgFlags::empty());
                    }
                    echoed += 1;
                }
                echoed
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().expect("echoer")
    }
}

impl Drop for Echoer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn set_checksum(icmp: &mut [u8]) {
    icmp[2..4].fill(0);
    let mut sum: u32 = icmp
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    icmp[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

fn duplicates_and_strays_are_ignored(allow_datagram: bool, want: SocketKind) {
    let net = TargetNet::new(8, 0).expect("target network");
    net.allow_datagram_sockets(allow_datagram).expect("sysctl");
    let rt = runtime();
    let pinger = open(&net, &rt, SocketChoice::Auto).expect("open pinger");
    assert_eq!(pinger.socket_kind(false), Some(want));
    let echoer = Echoer::start(&net);
    let targets = named(&net.addresses);
    let (c, mesh) = collector(pinger, &targets, 3, Duration::from_millis(200));
    let points = rt
        .block_on(c.collect(
            plexd_metrics::collector::Cycle::default(),
            &CancellationToken::new(),
        ))
        .expect("collect");
    // Wait until the echoer's copies of the last probes have arrived too: both its replies
    // to every request are counted by the time it reports how many requests it saw.
    let echoed = echoer.finish();
    assert_eq!(
        echoed,
        3 * targets.len() as u64,
        "the echoer saw every request"
    );
    rt.block_on(async {
        while mesh.icmp().stats().late_or_duplicate + mesh.icmp().stats().stray < 2 * echoed {
            tokio::task::yield_now().await;
        }
    });
    for p in &points {
        assert_eq!(
            (field(p, "probes_sent"), field(p, "probes_received")),
            (3, 3),
            "{}",
            p.data
        );
        assert!(field(p, "rtt_nano") > 0);
    }
    let stats = mesh.icmp().stats();
    assert_eq!(
        stats.replies, echoed,
        "one reply per probe was taken: {stats:?}"
    );
    assert_eq!(
        stats.late_or_duplicate, echoed,
        "every duplicate was ignored: {stats:?}"
    );
    assert_eq!(
        stats.stray, echoed,
        "every forged reply was ignored: {stats:?}"
    );
}

#[test]
fn duplicate_and_stray_replies_are_ignored_over_datagram_sockets() {
    if !require_privileges() {
        return;
    }
    duplicates_and_strays_are_ignored(true, SocketKind::Datagram);
}

#[test]
fn duplicate_and_stray_replies_are_ignored_over_raw_sockets() {
    if !require_privileges() {
        return;
    }
    duplicates_and_strays_are_ignored(false, SocketKind::Raw);
}

/// Starts `fping -C count` on `targets` in the pinger namespace, `period_ms` between a
/// target's probes and `interval_ms` between any two.
fn fping(
    net: &TargetNet,
    targets: &[IpAddr],
    count: u32,
    period_ms: u32,
    interval_ms: f64,
) -> std::process::Child {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        net.pinger.name(),
        "fping",
        "-q",
        "-I",
        &net.link,
    ])
    .args(["-C", &count.to_string(), "-p", &period_ms.to_string()])
    .args(["-i", &format!("{interval_ms:.2}")])
    .args(targets.iter().map(ToString::to_string))
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd.spawn().expect("start fping")
}

/// Parses `fping -C`'s summary lines: `10.77.0.1 : 0.05 0.04 -`.
fn fping_results(child: std::process::Child) -> BTreeMap<IpAddr, Vec<Option<f64>>> {
    let out = child.wait_with_output().expect("fping");
    let text = String::from_utf8_lossy(&out.stderr);
    let mut results = BTreeMap::new();
    for line in BufReader::new(text.as_bytes())
        .lines()
        .map_while(Result::ok)
    {
        let Some((addr, values)) = line.split_once(" : ") else {
            continue;
        };
        let Ok(addr) = addr.trim().parse::<IpAddr>() else {
            continue;
        };
        let values = values
            .split_whitespace()
            .map(|v| v.parse::<f64>().ok())
            .collect();
        results.insert(addr, values);
    }
    assert!(!results.is_empty(), "fping printed no results: {text}");
    results
}

fn median_ms(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[test]
fn another_pinger_at_the_same_time_does_not_disturb_either() {
    if !require_privileges() {
        return;
    }
    let net = TargetNet::new(8, 8).expect("target network");
    // Raw sockets see every reply in the namespace, the other pinger's too.
    net.allow_datagram_sockets(false).expect("sysctl");
    let rt = runtime();
    let pinger = open(&net, &rt, SocketChoice::Auto).expect("open pinger");
    assert_eq!(pinger.socket_kind(false), Some(SocketKind::Raw));
    let targets = named(&net.addresses);
    let (c, mesh) = collector(pinger, &targets, 5, Duration::from_millis(1_000));
    // fping runs for about 30 × 50 ms = 1.5 s, overlapping the whole collection.
    let other = fping(&net, &net.addresses, 30, 50, 1.0);
    let points = rt
        .block_on(c.collect(
            plexd_metrics::collector::Cycle::default(),
            &CancellationToken::new(),
        ))
        .expect("collect");
    let theirs = fping_results(other);
    for p in &points {
        assert_eq!(
            (field(p, "probes_sent"), field(p, "probes_received")),
            (5, 5),
            "{}",
            p.data
        );
    }
    let stats = mesh.icmp().stats();
    assert!(
        stats.stray > 0,
        "fping's replies reached the raw socket, so the two really overlapped: {stats:?}"
    );
    assert_eq!(stats.replies, 5 * targets.len() as u64);
    for addr in &net.addresses {
        let got = &theirs[addr];
        assert_eq!(got.len(), 30);
        assert!(
            got.iter().all(Option::is_some),
            "fping lost probes to {addr}: {got:?}"
        );
    }
}

fn agrees_with_fping(allow_datagram: bool) {
    let net = TargetNet::new(6, 6).expect("target network");
    net.allow_datagram_sockets(allow_datagram).expect("sysctl");
    let rt = runtime();
    let pinger = open(&net, &rt, SocketChoice::Auto).expect("open pinger");
    let targets = named(&net.addresses);
    const PROBES: u32 = 10;
    const SPREAD: Duration = Duration::from_millis(1_000);
    let (c, _) = collector(pinger, &targets, PROBES, SPREAD);
    let ours = rt
        .block_on(c.collect(
            plexd_metrics::collector::Cycle::default(),
            &CancellationToken::new(),
        ))
        .expect("collect");
    // fping paced like the collector (the same gap between a target's probes and between any
    // two probes): on a veth, a probe sent right after another one finds the network stack's
    // caches warm and returns in a third of the time, so the pacing must match.
    let period_ms = SPREAD.as_millis() as u32 / PROBES;
    let interval_ms = SPREAD.as_secs_f64() * 1e3 / f64::from(PROBES * targets.len() as u32);
    let theirs = fping_results(fping(&net, &net.addresses, PROBES, period_ms, interval_ms));
    let address_of: BTreeMap<&str, IpAddr> =
        targets.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    assert_eq!(ours.len(), targets.len());
    for p in &ours {
        let addr = &address_of[p.peer_id.as_str()];
        let their: Vec<f64> = theirs[addr].iter().flatten().copied().collect();
        assert_eq!(their.len(), PROBES as usize, "fping lost probes to {addr}");
        let their_ns = median_ms(&their) * 1e6;
        let our_ns = field(p, "rtt_nano") as f64;
        let tolerance = (their_ns * 0.10).max(100_000.0);
        eprintln!("{addr}: median ours {our_ns:.0} ns, fping {their_ns:.0} ns");
        assert!(
            (our_ns - their_ns).abs() <= tolerance,
            "{addr}: ours {our_ns} ns, fping {their_ns} ns"
        );
    }
}

#[test]
fn medians_agree_with_fping_over_datagram_sockets() {
    if !require_privileges() {
        return;
    }
    agrees_with_fping(true);
}

#[test]
fn medians_agree_with_fping_over_raw_sockets() {
    if !require_privileges() {
        return;
    }
    agrees_with_fping(false);
}

#[test]
fn the_agent_reports_latency_for_its_configured_targets() {
    if !require_privileges() {
        return;
    }
    let net = TargetNet::new(1, 1).expect("target network");
    let config = format!(
            "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  ebpf: {{ enabled: false }}\n  \
             latency:\n    interface: {}\n    probes: 2\n    targets:\n      near: {}\n      near6: \"{}\"\n      down: {V4_UNREACHABLE}\n",
            net.link, net.addresses[0], net.addresses[1]
        );
    let OnceRun { batch, stderr } = run_once(&net.pinger, &config);
    let latency: BTreeMap<&str, &MetricPoint> = batch
        .iter()
        .filter(|p| p.group == "latency")
        .map(|p| (p.peer_id.as_str(), p))
        .collect();
    assert_eq!(
        latency.keys().copied().collect::<Vec<_>>(),
        ["down", "near", "near6"]
    );
    for peer in ["near", "near6"] {
        let p = latency[peer];
        assert!(field(p, "rtt_nano") > 0, "{}", p.data);
        assert_eq!(field(p, "probes_received"), 2, "{}", p.data);
    }
    assert_eq!(field(latency["down"], "rtt_nano"), -1);
    let warning = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| {
            e["fields"]["message"] == "latency ping failed" || e["message"] == "latency ping failed"
        })
        .unwrap_or_else(|| panic!("no warning for the down peer: {stderr}"));
    assert_eq!(warning["level"], "WARN", "{warning}");
    let text = warning.to_string();
    assert!(text.contains("\"peer_id\":\"down\""), "{text}");
    assert!(text.contains("\"component\":\"metrics\""), "{text}");
    assert!(text.contains("host unreachable"), "{text}");
}

#[test]
fn a_recreated_mesh_interface_gets_a_fresh_socket() {
    if !require_privileges() {
        return;
    }
    let net = TargetNet::new(1, 0).expect("target network");
    let rt = runtime();
    let pinger = open(&net, &rt, SocketChoice::Auto).expect("open pinger");
    let target = net.addresses[0];
    let probe = |p: &IcmpPinger| {
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(1), p.probe(target)).await })
    };
    probe(&pinger).expect("answered").expect("answered");

    // The socket stays bound to the old interface index, so probes fail even once an
    // interface of the same name is back, until the pinger reopens it.
    net.disconnect().expect("delete the link");
    net.reconnect().expect("recreate the link");
    match probe(&pinger) {
        Ok(Err(IcmpError::Send { .. })) => {}
        other => panic!("expected a send error on the stale socket, got {other:?}"),
    }
    net.pinger
        .run(|| {
            let _entered = rt.enter();
            pinger.reopen_broken()
        })
        .expect("enter namespace")
        .expect("reopen");
    let rtt = probe(&pinger).expect("answered").expect("answered");
    assert!(rtt > Duration::ZERO);
}
