//! Settling the kernel's per-session loss windows and folding sessions into endpoints.
//!
//! The kernel counts sent messages and handshakes per endpoint in per-CPU maps, and received
//! transport messages (late and duplicate ones too) in their session, whose lock it holds
//! anyway. The lost count is a property of each session's window, computed with the same
//! formula the kernel uses to classify late counters. A session's figures only grow, so each
//! read adds their growth since the previous read to the session's current endpoint: the
//! per-endpoint figures stay cumulative when sessions come and go or a peer roams.
//!
//! [`SessionLedger`] is what the eBPF source remembers between reads; it is handed the
//! values the source copied out of the maps and never touches a map itself.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use plexd_metrics_common::{
    EndpointKey, EndpointStats, SessionRx, SessionState, CONFIRM_COUNTERS, SESSION_EXPIRY_NS,
};

use super::counters::{CounterSnapshot, EndpointCounters, NetworkKeyHasher};
use super::cumulative::{cumulative_fields, Cumulative};

/// An endpoint silent this long is removed from the map; its counters start from zero if
/// it comes back. Peers that roam leave their old endpoints behind, and without this they
/// would fill the map over time.
pub const ENDPOINT_EXPIRY_NS: u64 = 900_000_000_000;

/// Where a session lives, and its receiver index. The kernel keeps a session in one place,
/// but two CPUs can start one in both at once (`ProbeStat::SessionsSplit`): two windows,
/// each with its own figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionId {
    /// In its slot of the session array, which the kernel gives the next session once
    /// this one has ended.
    Slot(u32),
    /// In the session hash, from which the agent removes it once it has ended.
    Hash(u32),
}

/// The cumulative figures of a session, or their sum over sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SessionFigures {
    lost: u64,
    rx: SessionRx,
}

cumulative_fields!(SessionFigures { lost, rx });

impl SessionFigures {
    fn of(session: &SessionState, now_ns: u64, timeout_ns: u64) -> Self {
        Self {
            lost: session.lost(now_ns, timeout_ns),
            rx: session.rx,
        }
    }
}

/// The sessions' figures of one endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Folded {
    figures: SessionFigures,
    /// The latest message of any of its sessions, for expiry.
    last_seen_ns: u64,
    /// The last read that found the endpoint in the endpoint map.
    in_map: u64,
}

/// Probe-wide counters since the programs were loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeStats {
    /// Messages of endpoints the endpoint map had no room for.
    pub endpoint_overflows: u64,
    /// Transport messages of sessions the session map had no room for.
    pub session_overflows: u64,
    /// Malformed packets from endpoints without an entry.
    pub malformed_unknown: u64,
    /// Sessions the kernel created.
    pub sessions_created: u64,
    /// Entries the kernel could not allocate in time (see `ProbeStat::AllocationFailure`).
    pub allocation_failures: u64,
    /// Sessions started in two places at once (see `ProbeStat::SessionsSplit`).
    pub sessions_split: u64,
    /// Transport messages of indexes no handshake of this host announced, held before they
    /// had a window (see `ProbeStat::ProbationMessages`).
    pub probation_messages: u64,
    /// Sessions that left probation for a window (see `ProbeStat::SessionsPromoted`).
    pub sessions_promoted: u64,
}

/// Which of the probe-wide troubles grew since the last read: each is worth one warning
/// when it does, not one per read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeTrouble {
    /// A map had no room for an endpoint or a session.
    pub overflowed: bool,
    /// The kernel had no memory at hand for a new entry.
    pub allocation_failed: bool,
    /// A session began on two CPUs at once.
    pub session_split: bool,
    /// Messages of indexes this host never announced were held without giving a session a
    /// window: made-up indexes, or sessions older than the programs whose slot is taken.
    pub held_unannounced: bool,
}

/// An endpoint that expired in this read, and whether the endpoint map holds it (and so
/// must be told to drop it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The endpoint's map key.
    pub key: EndpointKey,
    /// Whether the endpoint map holds an entry for it.
    pub in_map: bool,
}

/// What the eBPF source remembers between reads of the maps.
#[derive(Debug, Default)]
pub struct SessionLedger {
    /// Each live session's figures as of the last read, and the number of that read.
    sessions: HashMap<SessionId, (SessionFigures, u64), NetworkKeyHasher>,
    /// What sessions received and lost, per endpoint, since attach.
    folded: HashMap<EndpointKey, Folded, NetworkKeyHasher>,
    /// Number of the current read: what was seen in it carries it, so that finding what
    /// was not takes no set of its own.
    read: u64,
    /// Sessions taken in by the current read.
    settled: usize,
    /// Endpoints of `folded` that the endpoint map held in the current read.
    folded_in_map: usize,
    /// Endpoints in the last snapshot: the next one is sized for them up front instead of
    /// growing (and rehashing) a dozen times on the way to ten thousand.
    endpoints: usize,
    /// The probe-wide figures at the last read, to tell when they grow.
    last_stats: ProbeStats,
}

impl SessionLedger {
    /// Starts a read: sessions and endpoints handed in from now on belong to it.
    pub fn begin_read(&mut self) {
        self.read += 1;
        self.settled = 0;
        self.folded_in_map = 0;
    }

    /// Takes in one started session as copied out of the maps at `now_ns`; returns whether
    /// it has ended and should be removed from the session hash.
    pub fn settle(
        &mut self,
        id: SessionId,
        session: &SessionState,
        now_ns: u64,
        timeout_ns: u64,
    ) -> bool {
        // A session is created empty and started under its lock with its first message;
        // until then it has no endpoint and nothing to add.
        if !session.started() {
            return false;
        }
        self.settled += 1;
        let now = SessionFigures::of(session, now_ns, timeout_ns);
        let before = self
            .sessions
            .insert(id, (now, self.read))
            .map(|(figures, _)| figures)
            .unwrap_or_default();
        let growth = now.since(&before);
        let ended = now_ns.saturating_sub(session.last_seen_ns) > SESSION_EXPIRY_NS;
        // An ended session that brings nothing new does not bring back an endpoint that
        // expired: a slot keeps its session until the kernel gives the slot to another.
        let folded = if ended && growth == SessionFigures::default() {
            self.folded.get_mut(&session.endpoint)
        } else {
            Some(self.folded.entry(session.endpoint).or_default())
        };
        if let Some(folded) = folded {
            folded.figures.accumulate(&growth);
            folded.last_seen_ns = folded.last_seen_ns.max(session.last_seen_ns);
        }
        ended
    }

    /// Forgets a session the source removed from the session hash.
    pub fn forget_session(&mut self, id: SessionId) {
        self.sessions.remove(&id);
    }

    /// Forgets the sessions this read did not see, which are gone from the maps (a slot
    /// that has not been started reads as no session). `removed` is how many the source
    /// removed itself (and forgot) in this read.
    pub fn forget_unseen_sessions(&mut self, removed: usize) {
        // There are some only if more are known than were kept, which spares a walk over
        // every session at each read.
        let kept = self.settled - removed;
        if self.sessions.len() > kept {
            let read = self.read;
            self.sessions.retain(|_, (_, seen)| *seen == read);
        }
    }

    /// An empty snapshot sized for the last one.
    pub fn new_snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            endpoints: std::collections::HashMap::with_capacity_and_hasher(
                self.endpoints,
                Default::default(),
            ),
            ..CounterSnapshot::default()
        }
    }

    /// Adds an endpoint of the endpoint map, its counters summed over the CPUs, to
    /// `snapshot`; returns whether it expired at `now_ns`.
    pub fn add_endpoint(
        &mut self,
        snapshot: &mut CounterSnapshot,
        key: EndpointKey,
        total: &EndpointStats,
        now_ns: u64,
    ) -> bool {
        let (figures, last_seen_ns) = match self.folded.get_mut(&key) {
            Some(f) => {
                f.in_map = self.read;
                self.folded_in_map += 1;
                (f.figures, f.last_seen_ns)
            }
            None => (SessionFigures::default(), 0),
        };
        snapshot
            .endpoints
            .insert(socket_addr(&key), counters(total, &figures));
        expires(total.last_seen_ns.max(last_seen_ns), now_ns)
    }

    /// Adds the endpoints heard only through their sessions (or that the endpoint map had
    /// no room for) to `snapshot`, and says which endpoints expired in this read, those of
    /// `expired_in_map` included.
    pub fn finish_snapshot(
        &mut self,
        snapshot: &mut CounterSnapshot,
        expired_in_map: Vec<EndpointKey>,
        now_ns: u64,
    ) -> Vec<Expired> {
        let mut expired: Vec<Expired> = expired_in_map
            .into_iter()
            .map(|key| Expired { key, in_map: true })
            .collect();
        // Usually the map holds every endpoint, and the walk is spared.
        if self.folded.len() > self.folded_in_map {
            for (key, folded) in &self.folded {
                if folded.in_map == self.read {
                    continue;
                }
                snapshot.endpoints.insert(
                    socket_addr(key),
                    counters(&EndpointStats::default(), &folded.figures),
                );
                if expires(folded.last_seen_ns, now_ns) {
                    expired.push(Expired {
                        key: *key,
                        in_map: false,
                    });
                }
            }
        }
        // Reported one last time above; forgotten after, and named as removed.
        for e in &expired {
            snapshot.removed.push(socket_addr(&e.key));
            self.folded.remove(&e.key);
        }
        self.endpoints = snapshot.endpoints.len();
        expired
    }

    /// Takes in the probe-wide counters of this read and says which troubles grew.
    pub fn note_probe_stats(&mut self, stats: &ProbeStats) -> ProbeTrouble {
        let last = std::mem::replace(&mut self.last_stats, *stats);
        let overflows = |s: &ProbeStats| s.endpoint_overflows.wrapping_add(s.session_overflows);
        ProbeTrouble {
            overflowed: overflows(stats) > overflows(&last),
            allocation_failed: stats.allocation_failures > last.allocation_failures,
            session_split: stats.sessions_split > last.sessions_split,
            held_unannounced: stats
                .probation_messages
                .wrapping_sub(last.probation_messages)
                > stats
                    .sessions_promoted
                    .wrapping_sub(last.sessions_promoted)
                    .saturating_mul(u64::from(CONFIRM_COUNTERS)),
        }
    }
}

fn expires(last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) > ENDPOINT_EXPIRY_NS
}

/// The endpoint as a socket address; IPv4-mapped keys become IPv4 addresses.
pub fn socket_addr(key: &EndpointKey) -> SocketAddr {
    match key.ipv4() {
        Some(v4) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(v4), key.port)),
        None => SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(key.addr), key.port, 0, 0)),
    }
}

/// The map key of a socket address; IPv4-mapped IPv6 addresses are IPv4 endpoints.
pub fn key_of(endpoint: SocketAddr) -> EndpointKey {
    match endpoint {
        SocketAddr::V4(a) => EndpointKey::v4(a.ip().octets(), a.port()),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => EndpointKey::v4(v4.octets(), a.port()),
            None => EndpointKey::v6(a.ip().octets(), a.port()),
        },
    }
}

/// One endpoint's counters summed over the CPUs of a per-CPU map entry.
pub fn sum_per_cpu(per_cpu: &[EndpointStats]) -> EndpointStats {
    let mut total = EndpointStats::default();
    for cpu in per_cpu {
        add(&mut total, cpu);
    }
    total
}

fn add(total: &mut EndpointStats, cpu: &EndpointStats) {
    total.rx_packets = total.rx_packets.wrapping_add(cpu.rx_packets);
    total.rx_bytes = total.rx_bytes.wrapping_add(cpu.rx_bytes);
    total.tx_packets = total.tx_packets.wrapping_add(cpu.tx_packets);
    total.tx_bytes = total.tx_bytes.wrapping_add(cpu.tx_bytes);
    total.rx_keepalives = total.rx_keepalives.wrapping_add(cpu.rx_keepalives);
    total.tx_keepalives = total.tx_keepalives.wrapping_add(cpu.tx_keepalives);
    total.initiations_sent = total.initiations_sent.wrapping_add(cpu.initiations_sent);
    total.initiations_received = total
        .initiations_received
        .wrapping_add(cpu.initiations_received);
    total.responses_sent = total.responses_sent.wrapping_add(cpu.responses_sent);
    total.responses_received = total
        .responses_received
        .wrapping_add(cpu.responses_received);
    total.cookies_sent = total.cookies_sent.wrapping_add(cpu.cookies_sent);
    total.cookies_received = total.cookies_received.wrapping_add(cpu.cookies_received);
    total.malformed = total.malformed.wrapping_add(cpu.malformed);
    total.last_seen_ns = total.last_seen_ns.max(cpu.last_seen_ns);
}

/// An endpoint's counters: its own, and what its sessions received and lost.
fn counters(stats: &EndpointStats, sessions: &SessionFigures) -> EndpointCounters {
    let rx = &sessions.rx;
    EndpointCounters {
        rx_packets: stats.rx_packets.wrapping_add(rx.packets),
        rx_bytes: stats.rx_bytes.wrapping_add(rx.bytes),
        tx_packets: stats.tx_packets,
        tx_bytes: stats.tx_bytes,
        rx_keepalives: stats.rx_keepalives.wrapping_add(rx.keepalives),
        tx_keepalives: stats.tx_keepalives,
        initiations_sent: stats.initiations_sent,
        initiations_received: stats.initiations_received,
        responses_sent: stats.responses_sent,
        responses_received: stats.responses_received,
        cookie_replies: stats.cookies_sent.wrapping_add(stats.cookies_received),
        malformed: stats.malformed,
        lost: sessions.lost,
        late: rx.late,
        duplicate: rx.duplicate,
        suspect: rx.suspect,
    }
}

#[cfg(test)]
mod tests {
    use plexd_metrics_common::SESSION_STARTED;

    use super::*;

    const TIMEOUT: u64 = 1_000_000_000;

    fn session(
        endpoint: EndpointKey,
        highest: u64,
        arrived: &[u64],
        last_seen_ns: u64,
    ) -> SessionState {
        let mut s = SessionState {
            flags: SESSION_STARTED,
            base: 0,
            highest,
            received: arrived.len() as u64,
            last_seen_ns,
            endpoint,
            ..SessionState::default()
        };
        s.checkpoints[0].highest = highest;
        s.checkpoints[0].first_ns = last_seen_ns;
        s.checkpoints[0].last_ns = last_seen_ns;
        for &c in arrived {
            s.window[((c >> 6) as usize) % s.window.len()] |= 1 << (c & 63);
        }
        s
    }

    fn lost(st: &SessionLedger, endpoint: &EndpointKey) -> u64 {
        st.folded[endpoint].figures.lost
    }

    fn rx(packets: u64) -> SessionRx {
        SessionRx {
            packets,
            bytes: packets * 100,
            keepalives: packets / 10,
            late: packets / 5,
            duplicate: packets / 20,
            suspect: packets / 20,
        }
    }

    #[test]
    fn received_growth_goes_to_the_current_endpoint_and_a_new_session_counts_from_zero() {
        let a = EndpointKey::v4([10, 0, 0, 1], 51820);
        let b = EndpointKey::v4([10, 0, 0, 9], 40000);
        let mut st = SessionLedger::default();
        let mut s = session(a, 5, &[0, 1, 2, 3, 4, 5], 1_000);
        s.rx = rx(40);
        st.settle(SessionId::Hash(3), &s, 2_000, TIMEOUT);
        st.settle(SessionId::Hash(3), &s, 3_000, TIMEOUT);
        assert_eq!(
            st.folded[&a].figures.rx,
            rx(40),
            "a second read adds nothing"
        );
        // Roamed: only what arrived since goes to b.
        s.endpoint = b;
        s.rx = rx(100);
        s.last_seen_ns = 4_000;
        st.settle(SessionId::Hash(3), &s, 4_000, TIMEOUT);
        assert_eq!(st.folded[&a].figures.rx, rx(40));
        assert_eq!(st.folded[&b].figures.rx, rx(60));
        assert_eq!(st.folded[&b].last_seen_ns, 4_000);
        // A new session under the same index: its figures start at zero.
        let mut fresh = session(b, 1, &[0, 1], 9_000);
        fresh.rx = rx(20);
        st.settle(SessionId::Hash(3), &fresh, 9_000, TIMEOUT);
        assert_eq!(st.folded[&b].figures.rx, rx(80));
    }

    #[test]
    fn sessions_not_started_add_nothing() {
        let mut st = SessionLedger::default();
        assert!(!st.settle(SessionId::Hash(5), &SessionState::default(), 1_000, TIMEOUT));
        assert!(st.folded.is_empty() && st.sessions.is_empty());
    }

    #[test]
    fn lost_growth_goes_to_the_current_endpoint_and_stays_when_sessions_go() {
        let a = EndpointKey::v4([10, 0, 0, 1], 51820);
        let b = EndpointKey::v4([10, 0, 0, 9], 40000);
        let mut st = SessionLedger::default();
        // Two of 0..=5 missing, settled after the timeout.
        let s1 = session(a, 5, &[0, 1, 3, 5], 1_000);
        assert!(!st.settle(SessionId::Hash(7), &s1, 1_000 + TIMEOUT, TIMEOUT));
        assert_eq!(lost(&st, &a), 2);
        // Reading again adds nothing.
        st.settle(SessionId::Hash(7), &s1, 2_000 + TIMEOUT, TIMEOUT);
        assert_eq!(lost(&st, &a), 2);
        // The peer roamed to b and lost one more: only the growth moves with it.
        let s2 = session(b, 8, &[0, 1, 3, 5, 6, 8], 5_000);
        st.settle(SessionId::Hash(7), &s2, 5_000 + TIMEOUT, TIMEOUT);
        assert_eq!((lost(&st, &a), lost(&st, &b)), (2, 1));
        // The session expires; the endpoints keep their counts.
        assert!(st.settle(
            SessionId::Hash(7),
            &s2,
            5_000 + SESSION_EXPIRY_NS + 1,
            TIMEOUT
        ));
        st.forget_session(SessionId::Hash(7));
        assert_eq!((lost(&st, &a), lost(&st, &b)), (2, 1));
        // A new session under the same index counts from zero.
        let s3 = session(a, 2, &[0, 2], 9_000);
        st.settle(SessionId::Hash(7), &s3, 9_000 + TIMEOUT, TIMEOUT);
        assert_eq!(lost(&st, &a), 3);
    }

    #[test]
    fn holes_younger_than_the_timeout_are_not_lost_yet() {
        let a = EndpointKey::v4([10, 0, 0, 1], 51820);
        let mut st = SessionLedger::default();
        let s = session(a, 5, &[0, 5], 1_000);
        st.settle(SessionId::Hash(1), &s, 1_000 + TIMEOUT - 1, TIMEOUT);
        assert_eq!(lost(&st, &a), 0);
        st.settle(SessionId::Hash(1), &s, 1_000 + TIMEOUT, TIMEOUT);
        assert_eq!(lost(&st, &a), 4);
    }

    #[test]
    fn endpoints_become_socket_addresses() {
        assert_eq!(
            socket_addr(&EndpointKey::v4([192, 0, 2, 7], 51820)),
            "192.0.2.7:51820".parse().unwrap()
        );
        let v6: Ipv6Addr = "2001:db8::7".parse().unwrap();
        assert_eq!(
            socket_addr(&EndpointKey::v6(v6.octets(), 443)),
            "[2001:db8::7]:443".parse().unwrap()
        );
    }

    #[test]
    fn keys_and_socket_addresses_round_trip() {
        for text in ["192.0.2.7:51820", "[2001:db8::7]:443"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(socket_addr(&key_of(addr)), addr);
        }
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:51820".parse().unwrap();
        assert_eq!(key_of(mapped), EndpointKey::v4([192, 0, 2, 7], 51820));
    }

    #[test]
    fn per_cpu_values_add_up_and_sessions_join() {
        let mut total = EndpointStats::default();
        let cpu = EndpointStats {
            rx_packets: 3,
            tx_bytes: 100,
            cookies_sent: 1,
            cookies_received: 2,
            last_seen_ns: 77,
            ..EndpointStats::default()
        };
        add(&mut total, &cpu);
        add(
            &mut total,
            &EndpointStats {
                last_seen_ns: 5,
                ..cpu
            },
        );
        let sessions = SessionFigures {
            lost: 9,
            rx: rx(40),
        };
        let c = counters(&total, &sessions);
        assert_eq!(
            (c.rx_packets, c.rx_bytes, c.tx_bytes, c.cookie_replies),
            (6 + 40, 4_000, 200, 6)
        );
        assert_eq!((c.late, c.duplicate, c.lost, c.suspect), (8, 2, 9, 2));
        assert_eq!(total.last_seen_ns, 77);
    }
}
