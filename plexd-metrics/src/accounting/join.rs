//! Joining the WireGuard device state with the kernel programs' per-endpoint counters:
//! one [`TunnelStats`] per peer.
//!
//! The device says who the peers are, where they are (their endpoint), when they last
//! shook hands and how many bytes crossed the tunnel. The kernel programs count per remote
//! endpoint, cumulatively since they were attached. The join turns those counts into
//! per-interval figures per peer: it remembers each endpoint's counts at the last read that
//! attributed it to a peer, and the endpoint each peer had then. A peer that roamed gets the
//! last counts of its old endpoint and the first of its new one in the interval of the move,
//! so nothing it sent falls between two endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap;

use super::counters::{CounterSnapshot, EndpointCounters};
use super::cumulative::Cumulative;
use super::device::{endpoint_key, Device, Peer};
use crate::collector::{no_handshake_time, TunnelStats};

/// A peer's endpoint at the last read.
#[derive(Debug)]
struct Remembered {
    endpoint: SocketAddr,
    text: String,
    generation: u64,
}

/// What the join remembers between reads.
#[derive(Debug, Default)]
pub struct JoinState {
    /// Each endpoint's cumulative counters at the last read that attributed it to a peer.
    baseline: FxHashMap<SocketAddr, Baseline>,
    /// Per device, per public key: the peer's endpoint at the last read, as reported, and
    /// that read's number. Looked up by `&str`, so that a read allocates only for new
    /// peers; the text is kept because formatting ten thousand addresses costs more than
    /// copying them.
    peers: FxHashMap<String, FxHashMap<String, Remembered>>,
    /// Number of the current read.
    generation: u64,
}

impl JoinState {
    /// One [`TunnelStats`] per peer of `devices`, with the interval's counts from
    /// `snapshot` (none when the kernel programs do not run).
    pub fn join(
        &mut self,
        devices: &[Device],
        snapshot: Option<&CounterSnapshot>,
        now: SystemTime,
        names: &BTreeMap<String, String>,
        stale_after: Duration,
    ) -> Vec<TunnelStats> {
        let count: usize = devices.iter().map(|d| d.peers.len()).sum();
        let mut stats = Vec::with_capacity(count);
        let Some(snapshot) = snapshot else {
            stats.extend(devices.iter().flat_map(|d| {
                d.peers.iter().map(|p| {
                    let text = p
                        .endpoint
                        .map(|e| endpoint_key(e).to_string())
                        .unwrap_or_default();
                    base_stats(&d.name, p, text, now, names, stale_after)
                })
            }));
            return stats;
        };
        self.generation += 1;
        let generation = self.generation;
        // Peers whose endpoint changed since the last read, with what they have so far: their
        // old endpoint's last counts are theirs too unless a peer has it now, which is known
        // only once every peer has been seen.
        let mut moved: Vec<(usize, SocketAddr, EndpointCounters)> = Vec::new();
        let mut i = 0;
        for device in devices {
            let memory = match self.peers.get_mut(device.name.as_str()) {
                Some(m) => m,
                None => self.peers.entry(device.name.clone()).or_default(),
            };
            for peer in &device.peers {
                let now_at = peer.endpoint.map(endpoint_key);
                let (previous, text) = match memory.get_mut(peer.public_key.as_str()) {
                    Some(slot) => {
                        let previous = slot.endpoint;
                        if let Some(e) = now_at.filter(|e| *e != previous) {
                            slot.endpoint = e;
                            slot.text = e.to_string();
                        }
                        slot.generation = generation;
                        (Some(previous), slot.text.clone())
                    }
                    None => match now_at {
                        Some(e) => {
                            let text = e.to_string();
                            memory.insert(
                                peer.public_key.clone(),
                                Remembered {
                                    endpoint: e,
                                    text: text.clone(),
                                    generation,
                                },
                            );
                            (None, text)
                        }
                        None => (None, String::new()),
                    },
                };
                // Should two peers have one endpoint, the kernel's counts cannot be split
                // between them and go to the first.
                let sum = match now_at {
                    Some(e) => {
                        claim(&mut self.baseline, e, generation, snapshot).unwrap_or_default()
                    }
                    None => EndpointCounters::default(),
                };
                if let Some(previous) = previous.filter(|p| Some(*p) != now_at) {
                    moved.push((i, previous, sum));
                }
                let mut s = base_stats(&device.name, peer, text, now, names, stale_after);
                fill_measured(&mut s, &sum);
                stats.push(s);
                i += 1;
            }
            // Every peer of the device was stamped above, each under its own key: anything
            // more is a peer that left.
            if memory.len() > device.peers.len() {
                memory.retain(|_, r| r.generation == generation);
            }
        }
        self.peers
            .retain(|name, _| devices.iter().any(|d| d.name == *name));
        for (i, previous, mut sum) in moved {
            if let Some(last) = claim(&mut self.baseline, previous, generation, snapshot) {
                sum.accumulate(&last);
                fill_measured(&mut stats[i], &sum);
            }
        }

        // An endpoint the source stopped counting starts from zero if it comes back.
        for e in &snapshot.removed {
            self.baseline.remove(e);
        }
        // The baseline holds the endpoints peers have now or had at the last read, and those
        // of the snapshot, less the ones the source names as dropped; this bounds the memory
        // should the source fail to name them.
        if self.baseline.len() > 2 * (snapshot.endpoints.len() + count) {
            self.baseline
                .retain(|e, b| b.claimed == self.generation || snapshot.endpoints.contains_key(e));
        }
        stats
    }
}

/// Takes `endpoint` for a peer in read `generation`: its counts since its baseline, which
/// moves on to them. `None` when a peer has taken it in this read already.
fn claim(
    baselines: &mut FxHashMap<SocketAddr, Baseline>,
    endpoint: SocketAddr,
    generation: u64,
    snapshot: &CounterSnapshot,
) -> Option<EndpointCounters> {
    let baseline = baselines.entry(endpoint).or_default();
    if baseline.claimed == generation {
        return None;
    }
    baseline.claimed = generation;
    // Nothing counted there (yet) leaves a zero baseline, so that counts the kernel starts
    // later are new in full.
    let now = snapshot
        .endpoints
        .get(&endpoint)
        .copied()
        .unwrap_or_default();
    let counts = now.since(&baseline.counts);
    baseline.counts = now;
    Some(counts)
}

/// An endpoint's counts at the last read that gave it to a peer, and the number of the
/// read that did.
#[derive(Debug, Default)]
struct Baseline {
    counts: EndpointCounters,
    claimed: u64,
}

/// The figures that come from the device alone.
fn base_stats(
    interface: &str,
    peer: &Peer,
    endpoint: String,
    now: SystemTime,
    names: &BTreeMap<String, String>,
    stale_after: Duration,
) -> TunnelStats {
    let stale = match peer.last_handshake {
        None => true,
        // A handshake "in the future" (the clock was set back) is recent, not stale.
        Some(t) => now.duration_since(t).is_ok_and(|age| age > stale_after),
    };
    let name = names.get(&peer.public_key);
    TunnelStats {
        peer_id: name.cloned().unwrap_or_else(|| peer.public_key.clone()),
        last_handshake_time: peer
            .last_handshake
            .map_or_else(no_handshake_time, DateTime::<Utc>::from),
        rx_bytes: peer.rx_bytes,
        tx_bytes: peer.tx_bytes,
        handshake_succeeded: peer.last_handshake.is_some(),
        handshake_stale: stale,
        packet_loss_percent: -1.0,
        endpoint,
        interface: interface.to_owned(),
        // Only when `peer_id` is a name: otherwise it is the key already.
        public_key: name.map(|_| peer.public_key.clone()).unwrap_or_default(),
        ..TunnelStats::default()
    }
}

/// The interval's figures measured by the kernel programs.
fn fill_measured(s: &mut TunnelStats, d: &EndpointCounters) {
    let seen = d.rx_packets + d.lost;
    s.packet_loss_percent = if seen == 0 {
        0.0
    } else {
        d.lost as f64 / seen as f64 * 100.0
    };
    s.rx_packets = Some(d.rx_packets);
    s.tx_packets = Some(d.tx_packets);
    s.lost_packets = Some(d.lost);
    s.late_packets = Some(d.late);
    s.duplicate_packets = Some(d.duplicate);
    s.suspect_packets = Some(d.suspect);
    s.handshakes_sent = Some(d.initiations_sent + d.responses_sent);
    s.handshakes_received = Some(d.initiations_received + d.responses_received);
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Devices, peers and snapshots for the join's tests and the tunnel reader's.

    use std::time::{Duration, SystemTime};

    use crate::accounting::counters::{CounterSnapshot, EndpointCounters};
    use crate::accounting::device::{Device, Implementation, Peer};

    pub(crate) const T0: u64 = 1_770_892_200;

    pub(crate) fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    pub(crate) fn peer(key: &str, endpoint: Option<&str>) -> Peer {
        Peer {
            public_key: key.to_owned(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: vec![],
            last_handshake: Some(at(T0 - 5)),
            rx_bytes: 104_857_600,
            tx_bytes: 52_428_800,
            persistent_keepalive: None,
        }
    }

    pub(crate) fn device(peers: Vec<Peer>) -> Vec<Device> {
        vec![Device {
            name: "wg0".into(),
            implementation: Implementation::Userspace,
            listen_port: 51820,
            fwmark: 0,
            peers,
        }]
    }

    pub(crate) fn counts(rx: u64, lost: u64) -> EndpointCounters {
        EndpointCounters {
            rx_packets: rx,
            tx_packets: rx * 2,
            lost,
            late: lost / 2,
            duplicate: 1,
            initiations_sent: 1,
            responses_received: 1,
            initiations_received: 2,
            ..EndpointCounters::default()
        }
    }

    pub(crate) fn snapshot(entries: &[(&str, EndpointCounters)]) -> CounterSnapshot {
        CounterSnapshot {
            endpoints: entries
                .iter()
                .map(|(e, c)| (e.parse().unwrap(), *c))
                .collect(),
            removed: Vec::new(),
            map_overflows: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn join(
        state: &mut JoinState,
        devices: &[Device],
        snap: Option<&CounterSnapshot>,
    ) -> Vec<TunnelStats> {
        state.join(
            devices,
            snap,
            at(T0),
            &BTreeMap::new(),
            Duration::from_secs(180),
        )
    }

    #[test]
    fn without_ebpf_loss_is_minus_one_and_the_measured_keys_are_absent() {
        let stats = join(
            &mut JoinState::default(),
            &device(vec![peer("A", Some("192.0.2.1:51820"))]),
            None,
        );
        assert_eq!(stats.len(), 1);
        let s = &stats[0];
        assert_eq!(s.packet_loss_percent, -1.0);
        assert_eq!(s.rx_packets, None);
        assert_eq!(s.lost_packets, None);
        assert_eq!(s.endpoint, "192.0.2.1:51820");
        assert_eq!((s.rx_bytes, s.tx_bytes), (104_857_600, 52_428_800));
        let json = serde_json::to_value(s).unwrap();
        assert!(json.get("rx_packets").is_none(), "{json}");
        assert_eq!(json["packet_loss_percent"], -1.0);
    }

    #[test]
    fn intervals_are_deltas_and_the_first_read_counts_since_attach() {
        let mut state = JoinState::default();
        let devices = device(vec![peer("A", Some("192.0.2.1:51820"))]);
        let first = join(
            &mut state,
            &devices,
            Some(&snapshot(&[("192.0.2.1:51820", counts(98, 2))])),
        );
        assert_eq!(first[0].rx_packets, Some(98));
        assert_eq!(first[0].lost_packets, Some(2));
        assert_eq!(first[0].packet_loss_percent, 2.0);
        assert_eq!(first[0].tx_packets, Some(196));
        assert_eq!(first[0].late_packets, Some(1));
        assert_eq!(first[0].duplicate_packets, Some(1));
        assert_eq!(first[0].handshakes_sent, Some(1));
        assert_eq!(first[0].handshakes_received, Some(3));

        let second = join(
            &mut state,
            &devices,
            Some(&snapshot(&[("192.0.2.1:51820", counts(98 + 180, 2 + 20))])),
        );
        assert_eq!(second[0].rx_packets, Some(180));
        assert_eq!(second[0].lost_packets, Some(20));
        assert_eq!(second[0].packet_loss_percent, 10.0);
        assert_eq!(second[0].handshakes_sent, Some(0));

        let idle = join(
            &mut state,
            &devices,
            Some(&snapshot(&[("192.0.2.1:51820", counts(278, 22))])),
        );
        assert_eq!(idle[0].rx_packets, Some(0));
        assert_eq!(
            idle[0].packet_loss_percent, 0.0,
            "nothing received or lost: 0, not NaN"
        );
    }

    #[test]
    fn a_roaming_peer_keeps_its_history_and_gets_both_endpoints_in_the_move() {
        let mut state = JoinState::default();
        let old = "192.0.2.1:51820";
        let new = "198.51.100.9:40000";
        join(
            &mut state,
            &device(vec![peer("A", Some(old))]),
            Some(&snapshot(&[(old, counts(100, 0))])),
        );
        // Between the reads the peer sent 10 more from the old address, then moved and sent
        // 50 from the new one, losing 5 there.
        let moved = device(vec![peer("A", Some(new))]);
        let s = join(
            &mut state,
            &moved,
            Some(&snapshot(&[(old, counts(110, 0)), (new, counts(50, 5))])),
        );
        assert_eq!(s[0].rx_packets, Some(60));
        assert_eq!(s[0].lost_packets, Some(5));
        assert_eq!(s[0].endpoint, new);
        // Afterwards only the new endpoint is the peer's: strays on the old one are not.
        let s = join(
            &mut state,
            &moved,
            Some(&snapshot(&[(old, counts(111, 0)), (new, counts(70, 5))])),
        );
        assert_eq!(s[0].rx_packets, Some(20));
    }

    #[test]
    fn an_old_endpoint_taken_over_by_another_peer_is_not_counted_twice() {
        let mut state = JoinState::default();
        let e1 = "192.0.2.1:51820";
        let e2 = "192.0.2.2:51820";
        join(
            &mut state,
            &device(vec![peer("A", Some(e1)), peer("B", Some(e2))]),
            Some(&snapshot(&[(e1, counts(10, 0)), (e2, counts(10, 0))])),
        );
        // A moves to a new address and B (behind the same NAT) gets A's old one.
        let e3 = "192.0.2.3:51820";
        let s = join(
            &mut state,
            &device(vec![peer("A", Some(e3)), peer("B", Some(e1))]),
            Some(&snapshot(&[
                (e1, counts(15, 0)),
                (e2, counts(12, 0)),
                (e3, counts(4, 0)),
            ])),
        );
        // e1's 5 new packets go to its owner now, B; A has its new endpoint's 4.
        assert_eq!(s[0].rx_packets, Some(4));
        // B also gets the last 2 of its own old endpoint e2, which nobody holds now.
        assert_eq!(s[1].rx_packets, Some(5 + 2));
    }

    #[test]
    fn an_endpoint_the_source_dropped_counts_from_zero_when_it_comes_back() {
        let mut state = JoinState::default();
        let e = "192.0.2.1:51820";
        let devices = device(vec![peer("A", Some(e))]);
        join(&mut state, &devices, Some(&snapshot(&[(e, counts(10, 1))])));
        // Reported one last time and dropped (silent too long), then back, and counting
        // past the old figures before the next read: every count is new.
        let mut last = snapshot(&[(e, counts(10, 1))]);
        last.removed.push(e.parse().unwrap());
        let s = join(&mut state, &devices, Some(&last));
        assert_eq!(s[0].rx_packets, Some(0));
        let s = join(&mut state, &devices, Some(&snapshot(&[(e, counts(25, 3))])));
        assert_eq!(s[0].rx_packets, Some(25));
        assert_eq!(s[0].lost_packets, Some(3));
    }

    #[test]
    fn an_endpoint_missing_from_a_snapshot_counts_from_zero_when_it_appears() {
        let mut state = JoinState::default();
        let e = "192.0.2.1:51820";
        let devices = device(vec![peer("A", Some(e))]);
        join(&mut state, &devices, Some(&snapshot(&[(e, counts(10, 1))])));
        let s = join(&mut state, &devices, Some(&snapshot(&[])));
        assert_eq!(s[0].rx_packets, Some(0));
        let s = join(&mut state, &devices, Some(&snapshot(&[(e, counts(25, 3))])));
        assert_eq!(s[0].rx_packets, Some(25));
    }

    #[test]
    fn a_peer_that_left_and_came_back_is_remembered_afresh() {
        let mut state = JoinState::default();
        let (a, b) = ("192.0.2.1:51820", "192.0.2.2:51820");
        let both = device(vec![peer("A", Some(a)), peer("B", Some(b))]);
        let counted = snapshot(&[(a, counts(10, 0)), (b, counts(20, 0))]);
        join(&mut state, &both, Some(&counted));
        // B leaves; its endpoint is then taken by A, whose counts there are all new to it.
        join(
            &mut state,
            &device(vec![peer("A", Some(a))]),
            Some(&counted),
        );
        let s = join(
            &mut state,
            &device(vec![peer("A", Some(b)), peer("B", None)]),
            Some(&snapshot(&[(a, counts(10, 0)), (b, counts(26, 0))])),
        );
        assert_eq!(
            s[0].rx_packets,
            Some(6),
            "A: b's growth since B's last read"
        );
        assert_eq!(s[1].rx_packets, Some(0), "B came back without endpoint");
        assert_eq!(s[1].endpoint, "");
    }

    #[test]
    fn two_peers_on_one_endpoint_the_first_gets_its_counts() {
        let mut state = JoinState::default();
        let e = "192.0.2.1:51820";
        let devices = device(vec![peer("A", Some(e)), peer("B", Some(e))]);
        let s = join(&mut state, &devices, Some(&snapshot(&[(e, counts(10, 1))])));
        assert_eq!((s[0].rx_packets, s[1].rx_packets), (Some(10), Some(0)));
        let s = join(&mut state, &devices, Some(&snapshot(&[(e, counts(15, 1))])));
        assert_eq!((s[0].rx_packets, s[1].rx_packets), (Some(5), Some(0)));
        // B leaves for an endpoint of its own: the shared one is not its old one to count.
        let apart = device(vec![peer("A", Some(e)), peer("B", Some("192.0.2.2:51820"))]);
        let s = join(
            &mut state,
            &apart,
            Some(&snapshot(&[
                (e, counts(17, 1)),
                ("192.0.2.2:51820", counts(3, 0)),
            ])),
        );
        assert_eq!((s[0].rx_packets, s[1].rx_packets), (Some(2), Some(3)));
    }

    #[test]
    fn counters_that_went_backwards_start_again() {
        let mut state = JoinState::default();
        let devices = device(vec![peer("A", Some("192.0.2.1:51820"))]);
        join(
            &mut state,
            &devices,
            Some(&snapshot(&[("192.0.2.1:51820", counts(500, 5))])),
        );
        // The programs were attached again: the counts restart from zero.
        let s = join(
            &mut state,
            &devices,
            Some(&snapshot(&[("192.0.2.1:51820", counts(30, 1))])),
        );
        assert_eq!(s[0].rx_packets, Some(30));
        assert_eq!(s[0].lost_packets, Some(1));
    }

    #[test]
    fn a_peer_without_endpoint_reports_zero_measured_traffic() {
        let s = join(
            &mut JoinState::default(),
            &device(vec![peer("A", None)]),
            Some(&snapshot(&[("192.0.2.1:51820", counts(10, 1))])),
        );
        assert_eq!(s[0].rx_packets, Some(0));
        assert_eq!(s[0].packet_loss_percent, 0.0);
        assert_eq!(s[0].endpoint, "");
    }

    #[test]
    fn ipv4_mapped_endpoints_match_the_kernel_counts() {
        let s = join(
            &mut JoinState::default(),
            &device(vec![peer("A", Some("[::ffff:192.0.2.1]:51820"))]),
            Some(&snapshot(&[("192.0.2.1:51820", counts(10, 0))])),
        );
        assert_eq!(s[0].rx_packets, Some(10));
        assert_eq!(s[0].endpoint, "192.0.2.1:51820");
    }

    #[test]
    fn handshake_age_decides_succeeded_and_stale() {
        let mut p_recent = peer("recent", None);
        p_recent.last_handshake = Some(at(T0 - 180));
        let mut p_old = peer("old", None);
        p_old.last_handshake = Some(at(T0 - 181));
        let mut p_never = peer("never", None);
        p_never.last_handshake = None;
        let mut p_future = peer("future", None);
        p_future.last_handshake = Some(at(T0 + 30));
        let s = join(
            &mut JoinState::default(),
            &device(vec![p_recent, p_old, p_never, p_future]),
            None,
        );
        let flags: Vec<(bool, bool)> = s
            .iter()
            .map(|s| (s.handshake_succeeded, s.handshake_stale))
            .collect();
        assert_eq!(
            flags,
            [(true, false), (true, true), (false, true), (true, false)]
        );
        assert_eq!(
            serde_json::to_value(&s[2]).unwrap()["last_handshake_time"],
            "0001-01-01T00:00:00Z",
            "Go's zero time, as the Go agent reports it"
        );
        assert_eq!(
            serde_json::to_value(&s[0]).unwrap()["last_handshake_time"],
            "2026-02-12T10:27:00Z"
        );
    }

    #[test]
    fn names_replace_keys_in_peer_id() {
        let names = BTreeMap::from([("A".to_owned(), "gateway-1".to_owned())]);
        let s = JoinState::default().join(
            &device(vec![peer("A", None), peer("B", None)]),
            None,
            at(T0),
            &names,
            Duration::from_secs(180),
        );
        assert_eq!(s[0].peer_id, "gateway-1");
        assert_eq!(s[1].peer_id, "B");
    }
}
