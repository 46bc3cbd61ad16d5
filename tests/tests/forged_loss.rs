//! Forged transport messages on a live wireguard-go session: datagrams with the session's
//! receiver index, a spoofed source and counters far ahead (which WireGuard rejects), and
//! replays of a real message. The agent's reported loss must still equal the router's drop
//! counter, and the forgeries must show up as `suspect_packets` (the replays as duplicates).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use plexd_metrics::api::MetricPoint;
use plexd_metrics_tests::agent::RunningAgent;
use plexd_metrics_tests::mesh::Mesh;
use plexd_metrics_tests::require_privileges;

const LOSSY_PINGS: u32 = 200;
const DROP_PERCENT: u8 = 10;
/// Forged counters per round: fewer than confirm a jump, and distinct.
const FORGED_PER_ROUND: u64 = 3;
/// How far ahead of the captured counter the forgeries are (the report that led to this
/// test used about a million).
const FORGED_AHEAD: u64 = 1_000_000;

/// A real transport message seen in the router: its UDP payload.
struct Captured {
    payload: Vec<u8>,
}

impl Captured {
    fn receiver(&self) -> [u8; 4] {
        self.payload[4..8].try_into().unwrap()
    }

    fn counter(&self) -> u64 {
        u64::from_le_bytes(self.payload[8..16].try_into().unwrap())
    }
}

fn check(ret: i32, what: &str) -> std::io::Result<i32> {
    if ret < 0 {
        Err(std::io::Error::other(format!(
            "{what}: {}",
            std::io::Error::last_os_error()
        )))
    } else {
        Ok(ret)
    }
}

/// An AF_PACKET socket for IPv4 on every interface of the namespace it is opened in, with a
/// receive timeout so that every read has a deadline.
fn packet_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket calls with valid arguments; the descriptor is owned at once.
    unsafe {
        let fd = check(
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                i32::from((libc::ETH_P_IP as u16).to_be()),
            ),
            "AF_PACKET socket",
        )?;
        let fd = OwnedFd::from_raw_fd(fd);
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        check(
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            ),
            "SO_RCVTIMEO",
        )?;
        Ok(fd)
    }
}

/// The first transport message from `src` to `dst:port` the socket holds, read until
/// `deadline`.
fn capture(
    fd: &OwnedFd,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    deadline: Instant,
) -> Option<Captured> {
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: a live socket and a buffer of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let p = &buf[..n as usize];
        if p.len() < 20 || p[0] >> 4 != 4 || p[9] != libc::IPPROTO_UDP as u8 {
            continue;
        }
        let ihl = usize::from(p[0] & 15) * 4;
        let udp = &p[ihl..];
        let (from, to) = (
            Ipv4Addr::new(p[12], p[13], p[14], p[15]),
            Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        );
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        let payload = &udp[8..];
        if from == src && to == dst && dport == port && payload.len() >= 32 && payload[0] == 4 {
            return Some(Captured {
                payload: payload.to_vec(),
            });
        }
    }
    None
}

/// A raw IPv4 socket that sends datagrams with any source address.
fn raw_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: a plain socket call; the descriptor is owned at once.
    unsafe {
        let fd = check(
            libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW),
            "raw socket",
        )?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Sends `payload` as a UDP datagram from `src` to `dst` (a spoofed source: the kernel
/// takes the header as written).
fn send_spoofed(
    fd: &OwnedFd,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> std::io::Result<()> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = libc::IPPROTO_UDP as u8;
    p[12..16].copy_from_slice(&src.0.octets());
    p[16..20].copy_from_slice(&dst.0.octets());
    // The kernel fills in the IP checksum; a UDP checksum of 0 means none, valid over IPv4.
    p[20..22].copy_from_slice(&src.1.to_be_bytes());
    p[22..24].copy_from_slice(&dst.1.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.0.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a live socket, a buffer of the given length and a valid address.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            p.as_ptr().cast(),
            p.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    check(sent as i32, "sendto").map(|_| ())
}

/// A transport message with the session's receiver index and `counter`, and a tag that
/// WireGuard's authentication rejects.
fn forged(receiver: [u8; 4], counter: u64) -> Vec<u8> {
    let mut m = vec![0u8; 32 + 16];
    m[0] = 4;
    m[4..8].copy_from_slice(&receiver);
    m[8..16].copy_from_slice(&counter.to_le_bytes());
    m
}

/// The agent in node 0's namespace of a fresh two-node mesh, with `ebpf` settings.
fn start_agent(mesh: &Mesh, dir: &std::path::Path, ebpf: &str) -> RunningAgent {
    std::fs::create_dir_all(dir).expect("temp dir");
    let config = dir.join("config.yaml");
    // Latency probing is off so that the only tunnel traffic is the test's own.
    std::fs::write(
        &config,
        format!(
            "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  latency:\n    enabled: false\n{ebpf}"
        ),
    )
    .expect("write config");
    let agent = RunningAgent::start(&mesh.nodes[0].ns, &config);
    agent.wait_for("kernel programs attached");
    agent
}

/// The sender's (node 1's) tunnel points the agent printed, after two more collect cycles
/// (the holes of the last interval settle by the collect after the one they opened in).
fn sender_points(mesh: &Mesh, agent: RunningAgent, dir: &std::path::Path) -> Vec<MetricPoint> {
    agent.wait_for("collect cycle done");
    agent.wait_for("collect cycle done");
    let (code, stdout) = agent.stop();
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(code, Some(0), "exit status after SIGTERM");
    let points: Vec<MetricPoint> = stdout
        .lines()
        .flat_map(|l| serde_json::from_str::<Vec<MetricPoint>>(l).expect("a JSON batch"))
        .filter(|p| p.group == "tunnel" && p.peer_id == mesh.nodes[1].keys.public)
        .collect();
    assert!(points.len() >= 2, "tunnel points for the sender: {stdout}");
    points
}

fn sum(points: &[MetricPoint], key: &str) -> u64 {
    points
        .iter()
        .map(|p| p.data.to_value()[key].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn forged_counters_change_no_loss_and_are_counted_as_suspect() {
    if !require_privileges() {
        return;
    }
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let (receiver, sender) = (&mesh.nodes[0], &mesh.nodes[1]);
    let dir = std::env::temp_dir().join(format!("plexd-forged-loss-{}", std::process::id()));
    let agent = start_agent(&mesh, &dir, "");
    // The session starts under the agent's eyes (its index announced in node 0's response),
    // so its window starts at its first message.
    mesh.handshake(1, 0).expect("handshake");

    // A real message in flight, seen where an on-path attacker sits: the router.
    let (listen, inject) = mesh
        .router
        .run(|| (packet_socket(), raw_socket()))
        .expect("enter the router");
    let (listen, inject) = (listen.expect("packet socket"), inject.expect("raw socket"));
    assert_eq!(mesh.ping(1, 0, 3).expect("ping"), 3);
    let real = capture(
        &listen,
        sender.underlay,
        receiver.underlay,
        receiver.listen_port,
        Instant::now() + Duration::from_secs(10),
    )
    .expect("a transport message from the sender within 10 s");
    drop(listen);
    let from = (sender.underlay, sender.listen_port);
    let to = (receiver.underlay, receiver.listen_port);

    // Replays of the real message: duplicates, nothing else.
    const REPLAYS: u64 = 2;
    for _ in 0..REPLAYS {
        send_spoofed(&inject, from, to, &real.payload).expect("replay");
    }
    let mut forged_sent = 0;
    let mut dropped = 0;
    for round in 0..2u64 {
        let ahead = real.counter() + FORGED_AHEAD * (round + 1);
        for i in 0..FORGED_PER_ROUND {
            send_spoofed(&inject, from, to, &forged(real.receiver(), ahead + i)).expect("forge");
            forged_sent += 1;
        }
        // Real loss after the forgery: the sender's messages go on from where they were,
        // which shows the forged ones for what they are.
        let (_, round_dropped) = mesh
            .lossy_echoes(1, 0, DROP_PERCENT, LOSSY_PINGS)
            .expect("lossy echoes");
        dropped += round_dropped;
    }

    let points = sender_points(&mesh, agent, &dir);
    assert_eq!(
        sum(&points, "lost_packets"),
        dropped,
        "lost_packets equal the router's drops despite the forgeries: {points:#?}"
    );
    assert_eq!(
        sum(&points, "suspect_packets"),
        forged_sent,
        "suspect_packets"
    );
    assert_eq!(
        sum(&points, "duplicate_packets"),
        REPLAYS,
        "the replays are duplicates"
    );
    assert_eq!(
        sum(&points, "late_packets"),
        0,
        "no real message looked late"
    );
}

#[test]
fn made_up_receiver_indexes_take_no_window_from_real_sessions() {
    if !require_privileges() {
        return;
    }
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let (receiver, sender) = (&mesh.nodes[0], &mesh.nodes[1]);
    let dir = std::env::temp_dir().join(format!("plexd-forged-flood-{}", std::process::id()));
    // Small maps, so that the flood below could fill them many times over: 64 slots and 64
    // sessions beyond them.
    const ROOM: u64 = 64;
    let agent = start_agent(
        &mesh,
        &dir,
        &format!("  ebpf:\n    max_peers: {ROOM}\n    max_sessions: {ROOM}\n"),
    );

    // Made-up indexes from the sender's address, some with one message, some with four
    // consecutive counters (enough to leave probation, but only for a free slot).
    let inject = mesh
        .router
        .run(raw_socket)
        .expect("enter the router")
        .expect("raw socket");
    let from = (sender.underlay, sender.listen_port);
    let to = (receiver.underlay, receiver.listen_port);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..ROOM * 40 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let index = (rng as u32).to_le_bytes();
        let messages = if i % 2 == 0 { 1 } else { 4 };
        for c in 0..messages {
            send_spoofed(&inject, from, to, &forged(index, 1_000 + c)).expect("flood");
        }
    }

    // A real session begins after the flood, and loses messages.
    mesh.handshake(1, 0).expect("handshake");
    let (_, dropped) = mesh
        .lossy_echoes(1, 0, DROP_PERCENT, LOSSY_PINGS)
        .expect("lossy echoes");
    let points = sender_points(&mesh, agent, &dir);
    assert_eq!(
        sum(&points, "lost_packets"),
        dropped,
        "the real session is measured despite the flood: {points:#?}"
    );
}
