//! Reading the per-endpoint counters and sessions out of the maps, for the
//! [`SessionLedger`] to settle and fold (see `accounting::sessions` for the rules).

use std::net::SocketAddr;

use aya::maps::{Array, HashMap, IterableMap as _, MapData, MapError, PerCpuArray, PerCpuHashMap};
use plexd_metrics_common::{
    EndpointKey, EndpointStats, PortSet, ProbeStat, SessionState, MAP_ENDPOINTS, MAP_LISTEN_PORTS,
    MAP_PROBE_STATS, MAP_SESSIONS, MAP_SESSION_SLOTS,
};

use super::{batch, EbpfError};
use crate::accounting::counters::CounterSnapshot;
use crate::accounting::sessions::{key_of, sum_per_cpu, ProbeStats, SessionId, SessionLedger};

/// `BPF_F_LOCK`: copy a value under its spin lock, so that no half-updated window is read.
const BPF_F_LOCK: u64 = 4;

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
    pub(super) ledger: SessionLedger,
    pub(super) scratch: batch::Scratch,
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
            probation_messages: get(ProbeStat::ProbationMessages)?,
            sessions_promoted: get(ProbeStat::SessionsPromoted)?,
        })
    }

    /// Settles every session at `now_ns` and returns every endpoint's counters.
    pub(super) fn read(&mut self, now_ns: u64) -> Result<CounterSnapshot, EbpfError> {
        self.ledger.begin_read();
        self.read_sessions(now_ns)?;

        let mut snapshot = self.ledger.new_snapshot();
        let mut expired_in_map = Vec::new();
        let ledger = &mut self.ledger;
        each_endpoint(
            &self.endpoints,
            self.cpus,
            &mut self.scratch,
            |key, total| {
                if ledger.add_endpoint(&mut snapshot, key, &total, now_ns) {
                    expired_in_map.push(key);
                }
            },
        )?;
        let expired = self
            .ledger
            .finish_snapshot(&mut snapshot, expired_in_map, now_ns);
        // Removed after the walk, so that the map never iterates while it shrinks.
        for e in expired.iter().filter(|e| e.in_map) {
            match self.endpoints.remove(&e.key) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(write_error(MAP_ENDPOINTS)(e)),
            }
        }

        let stats = self.probe_stats()?;
        snapshot.map_overflows = stats
            .endpoint_overflows
            .wrapping_add(stats.session_overflows);
        let trouble = self.ledger.note_probe_stats(&stats);
        if trouble.overflowed {
            tracing::warn!(
                component = "metrics",
                endpoint_overflows = stats.endpoint_overflows,
                session_overflows = stats.session_overflows,
                "eBPF maps are full: some peers or sessions are not measured; raise \
                 metrics.ebpf.max_peers or metrics.ebpf.max_sessions"
            );
        }
        if trouble.allocation_failed {
            tracing::warn!(
                component = "metrics",
                allocation_failures = stats.allocation_failures,
                "the kernel had no memory at hand for new eBPF map entries; the first messages \
                 of some new peers or sessions were not counted (they are on the next message)"
            );
        }
        if trouble.held_unannounced {
            tracing::info!(
                component = "metrics",
                probation_messages = stats.probation_messages,
                sessions_promoted = stats.sessions_promoted,
                "transport messages with receiver indexes no handshake of this host announced \
                 were held without a loss window: forged datagrams, or sessions that began \
                 before the agent whose slot is taken (measured from their next handshake)"
            );
        }
        if trouble.session_split {
            tracing::warn!(
                component = "metrics",
                sessions_split = stats.sessions_split,
                "a WireGuard session began on two CPUs at the moment its slot came free; its \
                 lost_packets may count messages that arrived"
            );
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
        let (ledger, timeout_ns) = (&mut self.ledger, self.reorder_timeout_ns);
        // Not `self.each_session`: the closure borrows the ledger mutably.
        each_session(
            &self.session_slots,
            &self.sessions,
            &mut self.scratch,
            |id, session| {
                // A slot is reused by the kernel; its ended session stays known until then,
                // so that it is not taken for a new one at the next read.
                if ledger.settle(id, session, now_ns, timeout_ns) {
                    if let SessionId::Hash(index) = id {
                        ended.push(index);
                    }
                }
            },
        )?;
        let removed = ended.len();
        for index in ended {
            match self.sessions.remove(&index) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(write_error(MAP_SESSIONS)(e)),
            }
            self.ledger.forget_session(SessionId::Hash(index));
        }
        self.ledger.forget_unseen_sessions(removed);
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
    match batch::for_each(map.map(), true, cpus, 0, scratch, |k, v| {
        f(k, sum_per_cpu(v))
    }) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {}
        Err(e) => return Err(batch_error(MAP_ENDPOINTS, e)),
    }
    for item in map.iter() {
        let (key, per_cpu) = item.map_err(read_error(MAP_ENDPOINTS))?;
        f(key, sum_per_cpu(&per_cpu));
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

    #[test]
    fn coarse_clock_moves_forward() {
        let a = coarse_now_ns();
        assert!(a > 0);
        assert!(coarse_now_ns() >= a);
    }
}
