//! Reading the per-endpoint counters and settling the per-session loss windows.
//!
//! The kernel counts sent messages and handshakes per endpoint in per-CPU maps, and received
//! transport messages (late and duplicate ones too) in their session, whose lock it holds
//! anyway. The lost count is a property of each session's window, computed here with the
//! same formula the kernel uses to classify late counters. A session's figures only grow,
//! so each read adds their growth since the previous read to the session's current
//! endpoint: the per-endpoint figures stay cumulative when sessions come and go or a peer
//! roams.

use std::collections::HashMap as StdHashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use aya::maps::{Array, HashMap, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuHashMap};
use plexd_metrics_common::{
    EndpointKey, EndpointStats, PortSet, ProbeStat, SessionRx, SessionState, MAP_ENDPOINTS,
    MAP_LISTEN_PORTS, MAP_PROBE_STATS, MAP_SESSIONS, MAP_SESSION_SLOTS, SESSION_EXPIRY_NS,
};

use super::{batch, EbpfError};
use crate::source::counters::{CounterSnapshot, EndpointCounters, NetworkKeyHasher};

/// `BPF_F_LOCK`: copy a value under its spin lock, so that no half-updated window is read.
const BPF_F_LOCK: u64 = 4;

/// An endpoint silent this long is removed from the map; its counters start from zero if
/// it comes back. Peers that roam leave their old endpoints behind, and without this they
/// would fill the map over time.
pub(super) const ENDPOINT_EXPIRY_NS: u64 = 900_000_000_000;

/// How often an insert that found the kernel's allocation caches empty is retried, a
/// millisecond apart.
const ENOMEM_RETRIES: u32 = 100;

/// The maps the agent reads and writes, and what it remembers between reads.
pub(super) struct Reader {
    pub(super) listen_ports: Array<MapData, PortSet>,
    pub(super) endpoints: PerCpuHashMap<MapData, EndpointKey, EndpointStats>,
    pub(super) session_slots: Array<MapData, SessionState>,
    pub(super) sessions: HashMap<MapData, u32, SessionState>,
    pub(super) probe_stats: PerCpuArray<MapData, u64>,
    pub(super) reorder_timeout_ns: u64,
    /// Possible CPUs: the number of values of a per-CPU map entry.
    pub(super) cpus: usize,
    pub(super) state: ReadState,
    pub(super) scratch: batch::Scratch,
}

/// What the agent remembers between reads.
#[derive(Debug, Default)]
pub(super) struct ReadState {
    /// Each live session's figures as of the last read, and the number of that read.
    sessions: StdHashMap<SessionId, (SessionFigures, u64), NetworkKeyHasher>,
    /// What sessions received and lost, per endpoint, since attach.
    folded: StdHashMap<EndpointKey, Folded, NetworkKeyHasher>,
    /// Number of the current read: what was seen in it carries it, so that finding what
    /// was not takes no set of its own.
    read: u64,
    /// Endpoints in the last snapshot: the next one is sized for them up front instead of
    /// growing (and rehashing) a dozen times on the way to ten thousand.
    endpoints: usize,
    /// Map overflows at the last read, to warn when they grow.
    overflows: u64,
    /// Allocation failures at the last read, likewise.
    allocation_failures: u64,
    /// Split sessions at the last read, likewise.
    sessions_split: u64,
}

/// Where a session lives, and its receiver index. The kernel keeps a session in one place,
/// but two CPUs can start one in both at once (`ProbeStat::SessionsSplit`): two windows,
/// each with its own figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum SessionId {
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

impl SessionFigures {
    fn of(session: &SessionState, now_ns: u64, timeout_ns: u64) -> Self {
        Self {
            lost: session.lost(now_ns, timeout_ns),
            rx: session.rx,
        }
    }

    /// What grew since `before`. Every figure of a session only grows: one that shrank
    /// means a new session took the index, and its figures count from zero.
    fn growth_since(&self, before: &Self) -> Self {
        let (a, b) = (self, before);
        let shrank = a.lost < b.lost
            || a.rx.packets < b.rx.packets
            || a.rx.bytes < b.rx.bytes
            || a.rx.keepalives < b.rx.keepalives
            || a.rx.late < b.rx.late
            || a.rx.duplicate < b.rx.duplicate;
        if shrank {
            return *self;
        }
        Self {
            lost: a.lost - b.lost,
            rx: SessionRx {
                packets: a.rx.packets - b.rx.packets,
                bytes: a.rx.bytes - b.rx.bytes,
                keepalives: a.rx.keepalives - b.rx.keepalives,
                late: a.rx.late - b.rx.late,
                duplicate: a.rx.duplicate - b.rx.duplicate,
            },
        }
    }

    fn add(&mut self, other: &Self) {
        self.lost = self.lost.wrapping_add(other.lost);
        let (a, b) = (&mut self.rx, &other.rx);
        a.packets = a.packets.wrapping_add(b.packets);
        a.bytes = a.bytes.wrapping_add(b.bytes);
        a.keepalives = a.keepalives.wrapping_add(b.keepalives);
        a.late = a.late.wrapping_add(b.late);
        a.duplicate = a.duplicate.wrapping_add(b.duplicate);
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
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`.
///
/// The same clock as the kernel's matters: a counter that this read settles as lost must
/// look settled to every packet the kernel processes afterwards, so this clock may not run
/// ahead of the kernel's.
pub(super) fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec; the clock id is a constant
    // every Linux since 2.6.32 has.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    debug_assert_eq!(rc, 0);
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn read_error(map: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::ReadMap { map, source }
}

fn write_error(map: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::WriteMap { map, source }
}

fn batch_error(map: &'static str, e: std::io::Error) -> EbpfError {
    EbpfError::ReadMap {
        map,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error: e,
        }),
    }
}

fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// The endpoint as a socket address; IPv4-mapped keys become IPv4 addresses.
pub(super) fn socket_addr(key: &EndpointKey) -> SocketAddr {
    match key.ipv4() {
        Some(v4) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(v4), key.port)),
        None => SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(key.addr), key.port, 0, 0)),
    }
}

/// The map key of a socket address; IPv4-mapped IPv6 addresses are IPv4 endpoints.
pub(super) fn key_of(endpoint: SocketAddr) -> EndpointKey {
    match endpoint {
        SocketAddr::V4(a) => EndpointKey::v4(a.ip().octets(), a.port()),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => EndpointKey::v4(v4.octets(), a.port()),
            None => EndpointKey::v6(a.ip().octets(), a.port()),
        },
    }
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
    }
}

impl ReadState {
    /// Takes in one session as read at `now_ns`; returns whether the session has expired
    /// and should be removed.
    fn settle(
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
        let now = SessionFigures::of(session, now_ns, timeout_ns);
        let before = self
            .sessions
            .insert(id, (now, self.read))
            .map(|(figures, _)| figures)
            .unwrap_or_default();
        let growth = now.growth_since(&before);
        let ended = now_ns.saturating_sub(session.last_seen_ns) > SESSION_EXPIRY_NS;
        // An ended session that brings nothing new does not bring back an endpoint that
        // expired: a slot keeps its session until the kernel gives the slot to another.
        let folded = if ended && growth == SessionFigures::default() {
            self.folded.get_mut(&session.endpoint)
        } else {
            Some(self.folded.entry(session.endpoint).or_default())
        };
        if let Some(folded) = folded {
            folded.figures.add(&growth);
            folded.last_seen_ns = folded.last_seen_ns.max(session.last_seen_ns);
        }
        ended
    }

    fn forget_session(&mut self, id: SessionId) {
        self.sessions.remove(&id);
    }
}

impl Reader {
    /// Writes the set of WireGuard listen ports.
    pub(super) fn set_listen_ports(&mut self, ports: &[u16]) -> Result<(), EbpfError> {
        let mut set = PortSet::default();
        for &port in ports {
            set.insert(port);
        }
        self.listen_ports
            .set(0, set, 0)
            .map_err(write_error(MAP_LISTEN_PORTS))
    }

    /// Probe-wide counters, summed over the CPUs.
    pub(super) fn probe_stats(&self) -> Result<ProbeStats, EbpfError> {
        let get = |which: ProbeStat| -> Result<u64, EbpfError> {
            let values = self
                .probe_stats
                .get(&(which as u32), 0)
                .map_err(read_error(MAP_PROBE_STATS))?;
            Ok(values.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
        };
        Ok(ProbeStats {
            endpoint_overflows: get(ProbeStat::EndpointOverflow)?,
            session_overflows: get(ProbeStat::SessionOverflow)?,
            malformed_unknown: get(ProbeStat::MalformedUnknown)?,
            sessions_created: get(ProbeStat::SessionsCreated)?,
            allocation_failures: get(ProbeStat::AllocationFailure)?,
            sessions_split: get(ProbeStat::SessionsSplit)?,
        })
    }

    /// Settles every session at `now_ns` and returns every endpoint's counters.
    pub(super) fn read(&mut self, now_ns: u64) -> Result<CounterSnapshot, EbpfError> {
        self.state.read += 1;
        let read = self.state.read;
        self.read_sessions(now_ns)?;

        let mut snapshot = CounterSnapshot {
            endpoints: std::collections::HashMap::with_capacity_and_hasher(
                self.state.endpoints,
                Default::default(),
            ),
            ..CounterSnapshot::default()
        };
        // Expired endpoints, and whether the endpoint map holds them.
        let mut expired = Vec::new();
        let expires = |last_seen_ns: u64| now_ns.saturating_sub(last_seen_ns) > ENDPOINT_EXPIRY_NS;
        let folded = &mut self.state.folded;
        // Endpoints with sessions that the map holds too, each once (the map's keys are
        // unique).
        let mut folded_in_map = 0;
        each_endpoint(
            &self.endpoints,
            self.cpus,
            &mut self.scratch,
            |key, total| {
                let (figures, last_seen_ns) = match folded.get_mut(&key) {
                    Some(f) => {
                        f.in_map = read;
                        folded_in_map += 1;
                        (f.figures, f.last_seen_ns)
                    }
                    None => (SessionFigures::default(), 0),
                };
                snapshot
                    .endpoints
                    .insert(socket_addr(&key), counters(&total, &figures));
                if expires(total.last_seen_ns.max(last_seen_ns)) {
                    expired.push((key, true));
                }
            },
        )?;
        // Endpoints heard only through their sessions (or that the map had no room for), if
        // any: usually the map holds every endpoint, and the walk is spared.
        if self.state.folded.len() > folded_in_map {
            for (key, folded) in &self.state.folded {
                if folded.in_map == read {
                    continue;
                }
                snapshot.endpoints.insert(
                    socket_addr(key),
                    counters(&EndpointStats::default(), &folded.figures),
                );
                if expires(folded.last_seen_ns) {
                    expired.push((*key, false));
                }
            }
        }
        // Reported one last time above; removed after, so that the map never iterates
        // while it shrinks.
        for (key, in_map) in expired {
            snapshot.removed.push(socket_addr(&key));
            if in_map {
                match self.endpoints.remove(&key) {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(write_error(MAP_ENDPOINTS)(e)),
                }
            }
            self.state.folded.remove(&key);
        }

        self.state.endpoints = snapshot.endpoints.len();

        let stats = self.probe_stats()?;
        snapshot.map_overflows = stats
            .endpoint_overflows
            .wrapping_add(stats.session_overflows);
        if snapshot.map_overflows > self.state.overflows {
            tracing::warn!(
                component = "metrics",
                endpoint_overflows = stats.endpoint_overflows,
                session_overflows = stats.session_overflows,
                "eBPF maps are full: some peers or sessions are not measured; raise \
                 metrics.ebpf.max_peers or metrics.ebpf.max_sessions"
            );
            self.state.overflows = snapshot.map_overflows;
        }
        if stats.allocation_failures > self.state.allocation_failures {
            tracing::warn!(
                component = "metrics",
                allocation_failures = stats.allocation_failures,
                "the kernel had no memory at hand for new eBPF map entries; the first messages \
                 of some new peers or sessions were not counted (they are on the next message)"
            );
            self.state.allocation_failures = stats.allocation_failures;
        }
        if stats.sessions_split > self.state.sessions_split {
            tracing::warn!(
                component = "metrics",
                sessions_split = stats.sessions_split,
                "a WireGuard session began on two CPUs at the moment its slot came free; its \
                 lost_packets may count messages that arrived"
            );
            self.state.sessions_split = stats.sessions_split;
        }
        Ok(snapshot)
    }

    /// Creates zeroed counters for `endpoints` that have none yet.
    pub(super) fn track_endpoints(&mut self, endpoints: &[SocketAddr]) -> Result<(), EbpfError> {
        const BPF_NOEXIST: u64 = 1;
        let zero = vec![EndpointStats::default(); self.cpus];
        let errno = |e: &MapError| match e {
            MapError::SyscallError(e) => e.io_error.raw_os_error(),
            _ => None,
        };
        for endpoint in endpoints {
            let mut attempts = 0;
            loop {
                let values = aya::maps::PerCpuValues::try_from(zero.clone()).map_err(|e| {
                    write_error(MAP_ENDPOINTS)(MapError::SyscallError(aya::sys::SyscallError {
                        call: "per-CPU values",
                        io_error: e,
                    }))
                })?;
                match self
                    .endpoints
                    .insert(key_of(*endpoint), values, BPF_NOEXIST)
                {
                    Ok(()) => break,
                    Err(e) if errno(&e) == Some(libc::EEXIST) => break,
                    // Entries of maps that are not preallocated come from per-CPU caches the
                    // kernel refills in the background, for system calls too: a burst drains
                    // them, and a moment later there is memory again.
                    Err(e) if errno(&e) == Some(libc::ENOMEM) && attempts < ENOMEM_RETRIES => {
                        attempts += 1;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(e) => return Err(write_error(MAP_ENDPOINTS)(e)),
                }
            }
        }
        Ok(())
    }

    fn read_sessions(&mut self, now_ns: u64) -> Result<(), EbpfError> {
        let mut ended = Vec::new();
        // Sessions taken in by this read: each_session passes started ones only, each once (a
        // receiver index has one slot).
        let mut settled = 0;
        let (state, timeout_ns) = (&mut self.state, self.reorder_timeout_ns);
        // Not `self.each_session`: the closure borrows the state mutably.
        each_session(
            &self.session_slots,
            &self.sessions,
            &mut self.scratch,
            |id, session| {
                settled += 1;
                // A slot is reused by the kernel; its ended session stays known here until then,
                // so that it is not taken for a new one at the next read.
                if state.settle(id, session, now_ns, timeout_ns) {
                    if let SessionId::Hash(index) = id {
                        ended.push(index);
                    }
                }
            },
        )?;
        let kept = settled - ended.len();
        for index in ended {
            match self.sessions.remove(&index) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(write_error(MAP_SESSIONS)(e)),
            }
            self.state.forget_session(SessionId::Hash(index));
        }
        // Sessions not seen in this read are gone from the maps (a slot that has not been
        // started reads as no session); there are some only if more are known than were
        // kept, which spares a walk over every session at each read.
        if self.state.sessions.len() > kept {
            let read = self.state.read;
            self.state.sessions.retain(|_, (_, seen)| *seen == read);
        }
        Ok(())
    }
}

/// Calls `f` with every endpoint of `map` and its counters summed over the `cpus` CPUs: in
/// batches, or key by key on kernels without batch lookups.
fn each_endpoint(
    map: &PerCpuHashMap<MapData, EndpointKey, EndpointStats>,
    cpus: usize,
    scratch: &mut batch::Scratch,
    mut f: impl FnMut(EndpointKey, EndpointStats),
) -> Result<(), EbpfError> {
    let total = |per_cpu: &[EndpointStats]| {
        let mut total = EndpointStats::default();
        for cpu in per_cpu {
            add(&mut total, cpu);
        }
        total
    };
    match batch::for_each(map.map(), true, cpus, 0, scratch, |k, v| f(k, total(v))) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
        Err(e) => return Err(batch_error(MAP_ENDPOINTS, e)),
    }
    for item in map.iter() {
        let (key, per_cpu) = item.map_err(read_error(MAP_ENDPOINTS))?;
        f(key, total(&per_cpu));
    }
    Ok(())
}

/// Calls `f` with every started session, each copied under its lock: the slots' and the
/// hash's.
fn each_session(
    slots: &Array<MapData, SessionState>,
    hash: &HashMap<MapData, u32, SessionState>,
    scratch: &mut batch::Scratch,
    mut f: impl FnMut(SessionId, &SessionState),
) -> Result<(), EbpfError> {
    let mut in_slot = |_: u32, v: &[SessionState]| {
        if let Some(s) = v.first().filter(|s| s.started()) {
            f(SessionId::Slot(s.receiver), s);
        }
    };
    match batch::for_each(slots.map(), false, 1, BPF_F_LOCK, scratch, &mut in_slot) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            for index in 0..slots.len() {
                let session = slots
                    .get(&index, BPF_F_LOCK)
                    .map_err(read_error(MAP_SESSION_SLOTS))?;
                in_slot(index, &[session]);
            }
        }
        Err(e) => return Err(batch_error(MAP_SESSION_SLOTS, e)),
    }
    let mut in_hash = |index: u32, v: &[SessionState]| {
        if let Some(s) = v.first().filter(|s| s.started()) {
            f(SessionId::Hash(index), s);
        }
    };
    match batch::for_each(hash.map(), false, 1, BPF_F_LOCK, scratch, &mut in_hash) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
        Err(e) => return Err(batch_error(MAP_SESSIONS, e)),
    }
    let indexes = hash
        .keys()
        .collect::<Result<Vec<u32>, _>>()
        .map_err(read_error(MAP_SESSIONS))?;
    for index in indexes {
        match hash.get(&index, BPF_F_LOCK) {
            Ok(session) => in_hash(index, &[session]),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(read_error(MAP_SESSIONS)(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: u64 = 1_000_000_000;

    fn session(
        endpoint: EndpointKey,
        highest: u64,
        arrived: &[u64],
        last_seen_ns: u64,
    ) -> SessionState {
        let mut s = SessionState {
            flags: plexd_metrics_common::SESSION_STARTED,
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

    fn lost(st: &ReadState, endpoint: &EndpointKey) -> u64 {
        st.folded[endpoint].figures.lost
    }

    fn rx(packets: u64) -> SessionRx {
        SessionRx {
            packets,
            bytes: packets * 100,
            keepalives: packets / 10,
            late: packets / 5,
            duplicate: packets / 20,
        }
    }

    #[test]
    fn received_growth_goes_to_the_current_endpoint_and_a_new_session_counts_from_zero() {
        let a = EndpointKey::v4([10, 0, 0, 1], 51820);
        let b = EndpointKey::v4([10, 0, 0, 9], 40000);
        let mut st = ReadState::default();
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
        let mut st = ReadState::default();
        assert!(!st.settle(SessionId::Hash(5), &SessionState::default(), 1_000, TIMEOUT));
        assert!(st.folded.is_empty() && st.sessions.is_empty());
    }

    #[test]
    fn lost_growth_goes_to_the_current_endpoint_and_stays_when_sessions_go() {
        let a = EndpointKey::v4([10, 0, 0, 1], 51820);
        let b = EndpointKey::v4([10, 0, 0, 9], 40000);
        let mut st = ReadState::default();
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
        let mut st = ReadState::default();
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
        assert_eq!((c.late, c.duplicate, c.lost), (8, 2, 9));
        assert_eq!(total.last_seen_ns, 77);
    }

    #[test]
    fn coarse_clock_moves_forward() {
        let a = coarse_now_ns();
        assert!(a > 0);
        assert!(coarse_now_ns() >= a);
    }
}
