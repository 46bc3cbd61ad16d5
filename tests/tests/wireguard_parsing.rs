//! The WireGuard programs against synthetic messages with chosen counters.
//!
//! A "peer" namespace sends crafted WireGuard messages over a veth to a "wg" namespace whose
//! interface carries the probe, as the underlay of a WireGuard node would. A plain UDP socket
//! on the WireGuard port receives every datagram: TC ingress has seen a datagram by the time
//! the socket has it, so receiving is the synchronisation, and receiving all of them shows
//! that the programs dropped nothing. Raw sockets are used only for frames the socket API
//! cannot produce (truncated and inconsistent headers).

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Barrier;
use std::time::Duration;

use plexd_metrics::accounting::counters::EndpointCounters;
use plexd_metrics::collector::KernelCounters as _;
use plexd_metrics::source::counters::EndpointCounterSource as _;
use plexd_metrics::source::ebpf::{ProbeOptions, UnderlayProbe};
use plexd_metrics_common::{session_slot, session_slot_shift, session_slots};
use plexd_metrics_tests::wg::{
    coarse_now, cookie_reply, initiation, ipv4_udp_frame, keepalive, mac, response, transport,
    RawLink,
};
use plexd_metrics_tests::{attach_probe, quiet_namespaces, require_privileges, NetNs, VethPair};

const WG_PORT: u16 = 51820;
const PEER_PORT: u16 = 40100;
/// Short enough to keep the tests quick, long enough that a test thread descheduled
/// between two sends does not turn a reordered counter into a lost one.
const TIMEOUT: Duration = Duration::from_millis(300);

fn setsockopt<T>(fd: &impl AsRawFd, level: i32, name: i32, value: &T) {
    // SAFETY: value points at a valid T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
}

/// A peer and a WireGuard node on one veth, the probe on the node's side.
struct Rig<'a> {
    peer_ns: &'a NetNs,
    wg_ns: &'a NetNs,
    veth: VethPair<'a>,
    probe: UnderlayProbe,
    peer: UdpSocket,
    wg: UdpSocket,
    peer_addr: SocketAddr,
    wg_addr: SocketAddr,
}

impl<'a> Rig<'a> {
    fn new(peer_ns: &'a NetNs, wg_ns: &'a NetNs, options: ProbeOptions) -> Self {
        let veth = VethPair::new(peer_ns, wg_ns).expect("create veth pair");
        let peer_addr = SocketAddr::new(IpAddr::V4(veth.a.addr), PEER_PORT);
        let wg_addr = SocketAddr::new(IpAddr::V4(veth.b.addr), WG_PORT);
        Self::with_addresses(peer_ns, wg_ns, veth, peer_addr, wg_addr, options)
    }

    fn with_addresses(
        peer_ns: &'a NetNs,
        wg_ns: &'a NetNs,
        veth: VethPair<'a>,
        peer_addr: SocketAddr,
        wg_addr: SocketAddr,
        options: ProbeOptions,
    ) -> Self {
        let bind = |ns: &NetNs, addr: SocketAddr| {
            let s = ns
                .run(move || UdpSocket::bind(addr))
                .expect("enter namespace")
                .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("set receive timeout");
            s
        };
        let wg = bind(wg_ns, wg_addr);
        let peer = bind(peer_ns, peer_addr);
        let dev = veth.b.name.clone();
        let probe = attach_probe(wg_ns, &dev, &options, &[WG_PORT]);
        Self {
            peer_ns,
            wg_ns,
            veth,
            probe,
            peer,
            wg,
            peer_addr,
            wg_addr,
        }
    }

    /// Sends the messages from the peer and waits until the node's socket has every one.
    /// In chunks, so that the socket's receive buffer never overflows.
    fn deliver(&self, messages: &[Vec<u8>]) {
        for chunk in messages.chunks(64) {
            for m in chunk {
                assert_eq!(self.peer.send_to(m, self.wg_addr).expect("send"), m.len());
            }
            self.expect_at_wg(chunk);
        }
    }

    fn expect_at_wg(&self, messages: &[Vec<u8>]) {
        let mut buf = vec![0u8; 65_536];
        for (i, m) in messages.iter().enumerate() {
            let (n, from) = self.wg.recv_from(&mut buf).unwrap_or_else(|e| {
                panic!("datagram {i} of {} not delivered: {e}", messages.len())
            });
            assert_eq!(from, self.peer_addr);
            assert_eq!(&buf[..n], &m[..], "datagram {i} changed or out of order");
        }
    }

    /// Announces the receiver indexes as the node's WireGuard does in its handshake
    /// responses: sessions with them get a window from their first message, counted from
    /// counter 0 (the kernel holds other indexes in probation until they look like a
    /// session).
    fn announce(&self, indexes: &[u32]) {
        self.reply(&indexes.iter().map(|&i| response(i)).collect::<Vec<_>>());
    }

    /// Sends the messages from the node to the peer and waits until the peer has them.
    fn reply(&self, messages: &[Vec<u8>]) {
        let mut buf = vec![0u8; 65_536];
        for m in messages {
            self.wg.send_to(m, self.peer_addr).expect("send");
        }
        for m in messages {
            let (n, _) = self.peer.recv_from(&mut buf).expect("reply not delivered");
            assert_eq!(&buf[..n], &m[..]);
        }
    }

    /// The counters of the peer's endpoint as the agent reads them now.
    fn counters(&self) -> EndpointCounters {
        self.counters_of(self.peer_addr)
    }

    fn counters_of(&self, endpoint: SocketAddr) -> EndpointCounters {
        let snapshot = self.probe.read_endpoints().expect("read the endpoints");
        snapshot
            .endpoints
            .get(&endpoint)
            .copied()
            .unwrap_or_default()
    }

    /// Waits until every hole opened so far is older than the reorder timeout: the wait is
    /// the feature under test, bounded by the timeout and one tick of the coarse clock.
    fn let_holes_age(&self, timeout: Duration) {
        let deadline = coarse_now() + timeout + Duration::from_millis(20);
        while coarse_now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn options(timeout: Duration) -> ProbeOptions {
    ProbeOptions {
        reorder_timeout: timeout,
        ..ProbeOptions::default()
    }
}

#[test]
fn reordering_within_the_window_is_late_not_lost() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    rig.announce(&[7]);
    let order: Vec<u64> = [0, 2, 1, 3, 6, 4, 5, 7]
        .into_iter()
        .chain(8..2_000)
        .chain([2_001, 2_000])
        .chain(2_002..2_100)
        // 1,000 counters behind the highest: still inside the 2,048-counter window.
        .chain([3_100, 2_100])
        .chain(2_101..3_100)
        .collect();
    let messages: Vec<_> = order.iter().map(|&c| transport(7, c, 64)).collect();
    rig.deliver(&messages);
    rig.let_holes_age(TIMEOUT);
    let c = rig.counters();
    assert_eq!(c.rx_packets, order.len() as u64);
    assert_eq!(c.rx_bytes, order.len() as u64 * (14 + 20 + 8 + 96));
    assert_eq!((c.lost, c.duplicate), (0, 0), "{c:?}");
    // 2 after 1 swapped, 6 before 4 and 5, 2,001 before 2,000; 3,100 came 1,000 early: it
    // waits as provisional until the stream reaches the 16 counters below it, which are
    // late from then on.
    assert_eq!(c.late, 1 + 2 + 1 + 16, "{c:?}");
}

#[test]
fn duplicates_are_counted_and_are_not_loss() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    rig.announce(&[9]);
    let order = [0u64, 1, 1, 2, 2, 2, 3, 0, 4];
    rig.deliver(&order.map(|c| transport(9, c, 16)));
    rig.let_holes_age(TIMEOUT);
    let c = rig.counters();
    assert_eq!(
        (c.rx_packets, c.duplicate, c.lost, c.late),
        (9, 4, 0, 0),
        "{c:?}"
    );
}

#[test]
fn a_hole_beyond_the_window_is_lost_without_waiting() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(Duration::from_secs(5)));
    rig.announce(&[11]);
    rig.deliver(&[transport(11, 0, 0), transport(11, 5_000, 0)]);
    // A jump this far waits for more counters close to it before it counts.
    assert_eq!(rig.counters().lost, 0);
    rig.deliver(
        &(4_997..5_000)
            .map(|c| transport(11, c, 0))
            .collect::<Vec<_>>(),
    );
    // 1..=2_952 are out of the window (its bottom is 5_000 - 2_047): lost at once, long
    // before the 5 s timeout; 2_953..=4_996 may still arrive.
    assert_eq!(rig.counters().lost, 2_952);
    // One of them arrives after all: late, and it never was among the lost.
    rig.deliver(&[transport(11, 4_000, 0)]);
    // One far behind arrives: late, and still lost (it was settled when it left).
    rig.deliver(&[transport(11, 10, 0)]);
    let c = rig.counters();
    assert_eq!((c.lost, c.late, c.rx_packets), (2_952, 2, 7), "{c:?}");
}

#[test]
fn a_hole_is_lost_once_the_reorder_timeout_has_passed() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    rig.deliver(&[0u64, 1, 3, 4].map(|c| keepalive(21, c)));
    assert_eq!(rig.counters().lost, 0, "counter 2 may still come");
    // No more packets: the agent settles the hole on its own.
    rig.let_holes_age(TIMEOUT);
    let c = rig.counters();
    assert_eq!((c.lost, c.late), (1, 0), "{c:?}");
    // It arrives after all: late, and it stays lost, as the README describes.
    rig.deliver(&[keepalive(21, 2)]);
    let c = rig.counters();
    assert_eq!((c.lost, c.late, c.duplicate), (1, 1, 0), "{c:?}");
    rig.deliver(&[keepalive(21, 2)]);
    assert_eq!(rig.counters().duplicate, 1);
}

#[test]
fn a_hole_filled_before_the_timeout_is_never_lost() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(Duration::from_secs(3)));
    rig.announce(&[22]);
    rig.deliver(&[0u64, 1, 3].map(|c| keepalive(22, c)));
    rig.deliver(&[keepalive(22, 2)]);
    rig.let_holes_age(Duration::from_secs(3));
    let c = rig.counters();
    assert_eq!((c.lost, c.late), (0, 1), "{c:?}");
}

#[test]
fn a_new_session_starts_a_new_window_and_is_not_loss() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    // The old session, first seen mid-stream; then a rekey: a new index from counter 0.
    let old: Vec<_> = (90_000..90_100).map(|c| transport(0x1111, c, 32)).collect();
    let new: Vec<_> = (0..100).map(|c| transport(0x2222, c, 32)).collect();
    rig.deliver(&old);
    rig.deliver(&new);
    // A straggler of the old session, after the new one started.
    rig.deliver(&[transport(0x1111, 90_100, 32)]);
    rig.let_holes_age(TIMEOUT);
    let c = rig.counters();
    assert_eq!(
        (c.rx_packets, c.lost, c.late, c.duplicate),
        (201, 0, 0, 0),
        "{c:?}"
    );
    let stats = rig.probe.probe_stats().expect("probe stats");
    assert_eq!(stats.sessions_created, 2);
}

/// `n` receiver indexes that all fall into one slot of the session array of a probe loaded
/// with `options`: the first takes the slot, the others go to the session hash.
fn sharing_a_slot(options: &ProbeOptions, n: usize) -> Vec<u32> {
    let shift = session_slot_shift(session_slots(options.max_endpoints));
    let slot = session_slot(1, shift);
    (1..)
        .filter(|&r| session_slot(r, shift) == slot)
        .take(n)
        .collect()
}

#[test]
fn sessions_that_share_a_slot_each_count_exactly() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let options = options(TIMEOUT);
    let rig = Rig::new(&p, &w, options.clone());
    let &[a, b, c] = &sharing_a_slot(&options, 3)[..] else {
        unreachable!("three indexes")
    };
    rig.announce(&[a, b, c]);
    // Interleaved, so that every message of b and c finds the slot held by a: a loses
    // counter 2, b loses counter 4, and c arrives backwards (first seen: 5; the others are
    // below where its window starts, late and not lost).
    for k in 0..6u64 {
        if k != 2 {
            rig.deliver(&[keepalive(a, k)]);
        }
        if k != 4 {
            rig.deliver(&[keepalive(b, k)]);
        }
        rig.deliver(&[keepalive(c, 5 - k)]);
    }
    rig.let_holes_age(TIMEOUT);
    let got = rig.counters();
    assert_eq!(
        (got.rx_packets, got.lost, got.late, got.duplicate),
        (5 + 5 + 6, 2, 5, 0),
        "{got:?}"
    );
    let stats = rig.probe.probe_stats().expect("probe stats");
    assert_eq!(
        (
            stats.sessions_created,
            stats.session_overflows,
            stats.sessions_split
        ),
        (3, 0, 0),
        "{stats:?}"
    );
}

#[test]
fn a_session_this_host_announced_counts_a_lost_first_message() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    // The node answers a handshake: its response names the index it will receive with.
    rig.deliver(&[initiation(0xaaaa)]);
    rig.reply(&[response(0xbbbb)]);
    // The peer's first transport message (counter 0) is lost on the way.
    rig.deliver(&[1u64, 2, 3].map(|c| keepalive(0xbbbb, c)));
    // A session the node did not announce starts where it is first seen.
    rig.deliver(&[5u64, 6].map(|c| keepalive(0xcccc, c)));
    rig.let_holes_age(TIMEOUT);
    let c = rig.counters();
    assert_eq!(c.lost, 1, "{c:?}");
}

#[test]
fn counters_near_the_top_of_u64() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    let top = u64::MAX;
    rig.deliver(&[top - 6, top - 5, top - 3, top - 1, top, top - 2, top].map(|c| keepalive(31, c)));
    rig.let_holes_age(TIMEOUT);
    let c = rig.counters();
    // top - 4 never came; top - 2 was late; top came twice.
    assert_eq!(
        (c.lost, c.late, c.duplicate, c.rx_packets),
        (1, 1, 1, 7),
        "{c:?}"
    );
}

#[test]
fn two_cpus_feeding_one_session_count_exactly_in_a_slot_and_in_the_hash() {
    // Two sessions that want the same slot: the first is found in it, the second in the
    // session hash, and each is fed by both CPUs at once.
    if !require_privileges() {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "this test needs two CPUs, the machine has {cpus}"
    );
    let (p, w) = quiet_namespaces();
    // Long enough that a counter held back by the other CPU is never settled before it
    // arrives, even on a loaded machine.
    let timeout = Duration::from_secs(2);
    let options = options(timeout);
    let rig = Rig::new(&p, &w, options.clone());
    let sessions = sharing_a_slot(&options, 2);
    rig.announce(&[sessions[0], sessions[1]]);
    const CHUNKS: u64 = 200;
    const CHUNK: u64 = 256;
    let highest = CHUNKS * CHUNK;
    let skipped = |c: u64| c % 97 == 96;
    assert!(
        !skipped(highest),
        "the last counter must be sent to close every hole"
    );
    // Counter 0 first, so that each session starts at 0 whichever thread wins the race.
    rig.deliver(
        &sessions
            .iter()
            .map(|&s| keepalive(s, 0))
            .collect::<Vec<_>>(),
    );
    let barrier = Barrier::new(2);
    let (peer, to) = (&rig.peer, rig.wg_addr);
    let before = rig
        .probe
        .ingress_packets_per_cpu()
        .expect("per-CPU counters");
    let sent_per_cpu: Vec<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2u64)
            .map(|cpu| {
                let (barrier, sessions) = (&barrier, &sessions);
                scope.spawn(move || {
                    let mut set = nix::sched::CpuSet::new();
                    set.set(cpu as usize).expect("cpu index");
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                        .expect("pin the thread");
                    // The veth delivers in the sender's softirq: this CPU runs TC ingress.
                    let mut sent = 0;
                    for chunk in 0..CHUNKS {
                        // Both threads work on the same 256 counters at once, even and odd,
                        // so they contend for the lock and never drift out of the window.
                        barrier.wait();
                        let start = 1 + chunk * CHUNK;
                        for c in (start + cpu..start + CHUNK).step_by(2) {
                            if !skipped(c) {
                                for &s in sessions {
                                    peer.send_to(&keepalive(s, c), to).expect("send");
                                    sent += 1;
                                }
                            }
                        }
                    }
                    sent
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("sender"))
            .collect()
    });
    let sent: u64 = sent_per_cpu.iter().sum();
    let holes = 2 * (1..=highest).filter(|&c| skipped(c)).count() as u64;
    assert_eq!(sent + holes, 2 * highest);
    rig.let_holes_age(timeout);
    let c = rig.counters();
    assert_eq!(
        c.rx_packets,
        sent + 2,
        "every datagram reached TC ingress: {c:?}"
    );
    assert_eq!((c.lost, c.duplicate), (holes, 0), "{c:?}");
    let after = rig
        .probe
        .ingress_packets_per_cpu()
        .expect("per-CPU counters");
    // Each thread's datagrams went through TC ingress on the CPU it was pinned to (other
    // packets, such as neighbour discovery, may add to either).
    for (cpu, sent) in sent_per_cpu.iter().enumerate() {
        assert!(
            after[cpu] - before[cpu] >= *sent,
            "CPU {cpu} must have fed the session its {sent} messages: {before:?} -> {after:?}"
        );
    }
}

#[test]
fn a_silent_endpoint_is_reported_once_more_then_dropped_and_counted_afresh() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    rig.announce(&[9]);
    rig.deliver(&[transport(9, 0, 64), transport(9, 1, 64)]);
    rig.reply(&[transport(4, 0, 64)]);
    let live = rig.probe.snapshot().expect("read");
    assert!(live.removed.is_empty(), "{:?}", live.removed);

    // Past the 15 minutes of silence after which an endpoint is forgotten.
    let last = rig
        .probe
        .snapshot_after(Duration::from_secs(901))
        .expect("read");
    let c = last
        .endpoints
        .get(&rig.peer_addr)
        .copied()
        .unwrap_or_default();
    assert_eq!(
        (c.rx_packets, c.tx_packets),
        (2, 1),
        "reported once more: {c:?}"
    );
    assert_eq!(last.removed, [rig.peer_addr]);

    // Forgotten, and not brought back by its session, which keeps its slot until the kernel
    // gives the slot to another: what it sends from now on counts from zero.
    let after = rig
        .probe
        .snapshot_after(Duration::from_secs(902))
        .expect("read");
    assert!(
        !after.endpoints.contains_key(&rig.peer_addr) && after.removed.is_empty(),
        "{after:?}"
    );
    rig.deliver(&[transport(9, 2, 64)]);
    rig.reply(&[transport(4, 1, 64)]);
    let c = rig.counters();
    assert_eq!((c.rx_packets, c.tx_packets, c.lost), (1, 1, 0), "{c:?}");
}

#[test]
fn handshakes_cookies_and_keepalives_count_in_their_direction() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    rig.deliver(&[initiation(1), initiation(2), response(3), cookie_reply(4)]);
    rig.reply(&[response(5), initiation(6), cookie_reply(7), cookie_reply(8)]);
    rig.deliver(&[keepalive(5, 0), keepalive(5, 1), transport(5, 2, 100)]);
    rig.reply(&[keepalive(3, 0), transport(3, 1, 1_000), transport(3, 2, 1)]);
    let c = rig.counters();
    assert_eq!(
        (c.initiations_received, c.responses_received),
        (2, 1),
        "{c:?}"
    );
    assert_eq!((c.initiations_sent, c.responses_sent), (1, 1), "{c:?}");
    assert_eq!(c.cookie_replies, 3, "{c:?}");
    assert_eq!((c.rx_packets, c.rx_keepalives), (3, 2), "{c:?}");
    assert_eq!((c.tx_packets, c.tx_keepalives), (3, 1), "{c:?}");
    let frame = |len: u64| 14 + 20 + 8 + len;
    assert_eq!(c.tx_bytes, frame(32) + frame(16 + 1_008 + 16) + frame(48));
    assert_eq!(c.malformed, 0);
}

#[test]
fn malformed_input_is_counted_has_no_effect_on_loss_and_is_not_dropped() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    rig.announce(&[51]);
    // The stream runs before, between and after the junk.
    rig.deliver(&[0u64, 1].map(|c| transport(51, c, 16)));
    let mut wrong_reserved = transport(51, 2, 16);
    wrong_reserved[1] = 1;
    let junk = [
        vec![4, 0, 0, 0, 51, 0, 0],          // truncated transport header
        transport(51, 2, 16)[..40].to_vec(), // transport size not a multiple of 16
        initiation(9)[..147].to_vec(),       // initiation one byte short
        [response(9), vec![0]].concat(),     // response one byte long
        cookie_reply(9)[..63].to_vec(),      // cookie reply one byte short
        wrong_reserved,                      // reserved bytes not zero
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), // not WireGuard at all
        vec![9; 148],                        // unknown message type
        Vec::new(),                          // empty datagram
    ];
    rig.deliver(&junk);
    rig.deliver(&[2u64, 3].map(|c| transport(51, c, 16)));
    // A datagram too big for the link: the sender fragments it, the receiver reassembles
    // it, TC sees the first fragment with the port (malformed) and the rest without.
    let big = transport(51, 4, 3_000);
    rig.deliver(std::slice::from_ref(&big));
    rig.deliver(&[5u64, 6].map(|c| transport(51, c, 16)));
    rig.let_holes_age(TIMEOUT);
    let c = rig.counters();
    assert_eq!(c.malformed, junk.len() as u64 + 1, "{c:?}");
    // The fragmented message is not a counter seen: 4 is lost.
    assert_eq!(
        (c.rx_packets, c.lost, c.late, c.duplicate),
        (6, 1, 0, 0),
        "{c:?}"
    );
    // UDP on another port is not WireGuard's business.
    let other = rig
        .wg_ns
        .run(|| UdpSocket::bind((rig.veth.b.addr, 9_999)))
        .expect("enter namespace")
        .expect("bind");
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set receive timeout");
    rig.peer
        .send_to(&transport(51, 7, 16), (rig.veth.b.addr, 9_999))
        .expect("send");
    other.recv_from(&mut [0u8; 128]).expect("delivered");
    let c = rig.counters();
    assert_eq!(
        (c.malformed, c.rx_packets),
        (junk.len() as u64 + 1, 6),
        "{c:?}"
    );
}

/// An Ethernet/IPv4/UDP frame from the peer to the node with the UDP length set to
/// `udp_len` and the last `cut` bytes cut off.
fn raw_frame(rig: &Rig<'_>, payload: &[u8], udp_len: u16, cut: usize) -> Vec<u8> {
    let mut f = ipv4_udp_frame(
        mac(&rig.veth.b.mac),
        mac(&rig.veth.a.mac),
        (rig.veth.a.addr, PEER_PORT),
        (rig.veth.b.addr, WG_PORT),
        payload,
    );
    f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&udp_len.to_be_bytes());
    f.truncate(f.len() - cut);
    f
}

/// Sends raw frames out of the peer's end of the veth.
fn send_raw(rig: &Rig<'_>, frames: &[Vec<u8>]) {
    let ifname = rig.veth.a.name.clone();
    rig.peer_ns
        .run(move || {
            let link = RawLink::open(&ifname).expect("AF_PACKET socket");
            for f in frames {
                link.send(f).expect("send a raw frame");
            }
        })
        .expect("enter namespace");
}

#[test]
fn inconsistent_and_truncated_headers_are_malformed_or_ignored() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    rig.announce(&[61]);
    rig.deliver(&[transport(61, 0, 16)]);
    let before = rig.probe.read().expect("totals").ingress_packets;
    let msg = transport(61, 1, 16);
    send_raw(
        &rig,
        &[
            // The UDP length claims more than the packet holds: malformed.
            raw_frame(&rig, &msg, (8 + msg.len() + 100) as u16, 0),
            // The frame ends inside the UDP header: the port is unknown, not counted.
            raw_frame(&rig, &msg, (8 + msg.len()) as u16, msg.len() + 3),
        ],
    );
    // The stack drops both; a datagram behind them shows that TC has seen them.
    rig.deliver(&[transport(61, 1, 16)]);
    assert_eq!(
        rig.probe.read().expect("totals").ingress_packets,
        before + 3
    );
    let c = rig.counters();
    assert_eq!((c.malformed, c.rx_packets, c.lost), (1, 2, 0), "{c:?}");
}

/// Gives both ends of the veth IPv6 addresses, without duplicate address detection and
/// with permanent neighbour entries, so that the first packet goes out at once.
fn enable_ipv6(peer_ns: &NetNs, wg_ns: &NetNs, veth: &VethPair<'_>) -> (Ipv6Addr, Ipv6Addr) {
    let a: Ipv6Addr = "fd00:c9::1".parse().unwrap();
    let b: Ipv6Addr = "fd00:c9::2".parse().unwrap();
    for (ns, me, my_addr, peer, peer_addr) in [
        (peer_ns, &veth.a, a, &veth.b, b),
        (wg_ns, &veth.b, b, &veth.a, a),
    ] {
        ns.sysctl_net(&format!("ipv6/conf/{}/disable_ipv6", me.name), "0")
            .expect("enable IPv6");
        ns.ip(&[
            "addr",
            "add",
            &format!("{my_addr}/64"),
            "dev",
            &me.name,
            "nodad",
        ])
        .expect("add IPv6 address");
        ns.ip(&[
            "neigh",
            "replace",
            &peer_addr.to_string(),
            "lladdr",
            &peer.mac,
            "dev",
            &me.name,
            "nud",
            "permanent",
        ])
        .expect("add neighbour");
    }
    (a, b)
}

#[test]
fn ipv6_with_extension_headers_and_fragments() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let veth = VethPair::new(&p, &w).expect("create veth pair");
    let (a, b) = enable_ipv6(&p, &w, &veth);
    let peer_addr = SocketAddr::new(IpAddr::V6(a), PEER_PORT);
    let wg_addr = SocketAddr::new(IpAddr::V6(b), WG_PORT);
    let rig = Rig::with_addresses(&p, &w, veth, peer_addr, wg_addr, options(TIMEOUT));
    rig.announce(&[71]);
    rig.deliver(&[0u64, 1].map(|c| transport(71, c, 16)));
    // A destination options header (8 bytes, one PadN option) on every datagram from now on.
    let dstopts: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    setsockopt(&rig.peer, libc::IPPROTO_IPV6, libc::IPV6_DSTOPTS, &dstopts);
    // A valid message behind the extension header is a message; a wrong size is malformed.
    rig.deliver(&[transport(71, 2, 16), transport(71, 3, 16)[..40].to_vec()]);
    // A fragmented datagram: the first fragment carries a fragment header.
    rig.deliver(&[transport(71, 4, 3_000)]);
    rig.deliver(&[transport(71, 5, 16)]);
    rig.let_holes_age(TIMEOUT);
    let c = rig.counters_of(peer_addr);
    assert_eq!((c.rx_packets, c.malformed), (4, 2), "{c:?}");
    assert_eq!(
        c.rx_bytes,
        2 * (14 + 40 + 8 + 48) + 2 * (14 + 40 + 8 + 8 + 48),
        "{c:?}"
    );
    // 3 was cut short and 4 fragmented: neither was seen as a counter, both are lost.
    assert_eq!((c.lost, c.late), (2, 0), "{c:?}");
}

#[test]
fn gso_packets_are_counted_per_segment() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    rig.deliver(&[transport(81, 0, 16)]);
    let before = rig.probe.read().expect("totals").ingress_packets;
    // Ten transport messages of 48 bytes in one send with UDP_SEGMENT: one packet with ten
    // segments on the veth, as wireguard-go sends batches; counter 5 is missing.
    let segment: i32 = 48;
    setsockopt(&rig.peer, libc::SOL_UDP, libc::UDP_SEGMENT, &segment);
    let counters: Vec<u64> = (1..=11).filter(|&c| c != 5).collect();
    let batch: Vec<u8> = counters
        .iter()
        .flat_map(|&c| transport(81, c, 16))
        .collect();
    rig.peer
        .send_to(&batch, rig.wg_addr)
        .expect("send the batch");
    let messages: Vec<_> = counters.iter().map(|&c| transport(81, c, 16)).collect();
    rig.expect_at_wg(&messages);
    assert_eq!(
        rig.probe.read().expect("totals").ingress_packets,
        before + 1,
        "the batch crossed TC as one packet; the test needs that"
    );
    rig.let_holes_age(TIMEOUT);
    let c = rig.counters();
    assert_eq!((c.rx_packets, c.lost, c.late), (11, 1, 0), "{c:?}");
    assert_eq!(c.rx_bytes, 11 * (14 + 20 + 8 + 48), "{c:?}");
}

#[test]
fn only_listen_ports_are_parsed_and_they_can_change() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    rig.announce(&[91]);
    rig.probe
        .set_listen_ports(&[WG_PORT + 1])
        .expect("set ports");
    rig.deliver(&[transport(91, 0, 16)]);
    assert_eq!(rig.counters().rx_packets, 0);
    rig.probe
        .set_listen_ports(&[1, WG_PORT])
        .expect("set ports");
    rig.deliver(&[transport(91, 1, 16)]);
    assert_eq!(rig.counters().rx_packets, 1);
}

#[test]
fn full_maps_count_overflows_instead_of_failing_silently() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let options = ProbeOptions {
        max_endpoints: 2,
        max_sessions: 2,
        ..options(TIMEOUT)
    };
    let rig = Rig::new(&p, &w, options.clone());
    // Sessions that all want one slot: the first has it, the next two fill the hash.
    let index = sharing_a_slot(&options, 6);
    // Four sessions from one endpoint: the fourth has no window, and its messages are
    // counted in the endpoint's own counters.
    for &index in &index[..4] {
        rig.announce(&[index]);
        rig.deliver(&[keepalive(index, 0), keepalive(index, 1)]);
    }
    // Two more endpoints with sessions of their own: neither session fits, and of their
    // endpoints one fits and one does not.
    let mut other = Vec::new();
    for (port, index) in [(PEER_PORT + 1, index[4]), (PEER_PORT + 2, index[5])] {
        rig.announce(&[index]);
        let s = rig
            .peer_ns
            .run(|| UdpSocket::bind((rig.veth.a.addr, port)))
            .expect("enter namespace")
            .expect("bind");
        s.send_to(&keepalive(index, 0), rig.wg_addr).expect("send");
        let mut buf = [0u8; 64];
        rig.wg.recv_from(&mut buf).expect("delivered");
        other.push(s.local_addr().expect("bound address"));
    }
    let stats = rig.probe.probe_stats().expect("probe stats");
    assert_eq!(stats.session_overflows, 2 + 2, "{stats:?}");
    assert_eq!(stats.endpoint_overflows, 1, "{stats:?}");
    let snapshot = rig.probe.read_endpoints().expect("read");
    assert_eq!(snapshot.map_overflows, 5);
    assert_eq!(snapshot.endpoints.len(), 2, "{snapshot:?}");
    assert_eq!(snapshot.endpoints[&rig.peer_addr].rx_packets, 8);
    assert_eq!(snapshot.endpoints[&other[0]].rx_packets, 1);
}

#[test]
fn tracked_endpoints_have_counters_before_their_traffic() {
    if !require_privileges() {
        return;
    }
    let (p, w) = quiet_namespaces();
    let rig = Rig::new(&p, &w, options(TIMEOUT));
    rig.announce(&[3]);
    let other: SocketAddr = "192.0.2.9:51820".parse().unwrap();
    rig.probe
        .track_endpoints(&[rig.peer_addr, other, rig.peer_addr])
        .expect("track");
    let snapshot = rig.probe.read_endpoints().expect("read");
    assert_eq!(snapshot.endpoints.len(), 2);
    assert_eq!(snapshot.endpoints[&other], EndpointCounters::default());
    rig.deliver(&[keepalive(3, 0), keepalive(3, 1)]);
    // Tracking again keeps what was counted.
    rig.probe.track_endpoints(&[rig.peer_addr]).expect("track");
    assert_eq!(rig.counters().rx_packets, 2);
    let stats = rig.probe.probe_stats().expect("probe stats");
    assert_eq!(
        (stats.endpoint_overflows, stats.allocation_failures),
        (0, 0)
    );
}
