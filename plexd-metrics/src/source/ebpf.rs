//! Loading and attaching the kernel programs, and reading their maps.
//!
//! [`UnderlayProbe`] owns everything it puts into the kernel: the programs, their attachments
//! and, on kernels without TCX, any `clsact` qdisc it had to create. Dropping it takes all of
//! that away again, so an agent that stops (or a test that fails) leaves the node's interfaces
//! as it found them.

mod batch;
mod endpoints;

use std::collections::HashSet;
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap};
use aya::programs::links::LinkOrder;
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError};
use aya::programs::{Link as _, ProgramError, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use plexd_metrics_common::{
    checkpoint_ns, session_slot_shift, session_slots, Direction, PacketCounters,
    DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_SESSIONS, GLOBAL_CHECKPOINT_NS, GLOBAL_REORDER_TIMEOUT_NS,
    GLOBAL_SESSION_SLOT_SHIFT, MAP_ENDPOINTS, MAP_FRESH_SESSIONS, MAP_LISTEN_PORTS,
    MAP_PACKET_COUNTERS, MAP_PROBE_STATS, MAP_SESSIONS, MAP_SESSION_SLOTS, PROG_EGRESS,
    PROG_INGRESS,
};

use crate::collector::{BoxError, KernelCounters, KernelTotals};
use crate::source::counters::{CounterSnapshot, EndpointCounterSource};
pub use endpoints::ProbeStats;
use endpoints::Reader;

/// The kernel programs this agent was built with, as written by `cargo xtask build-ebpf`.
///
/// Empty when the agent was built before the object existed; [`UnderlayProbe::attach`] then
/// refuses with [`EbpfError::NoObject`] instead of failing deep inside the ELF parser.
pub fn embedded_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/plexd-metrics-ebpf.o"))
}

/// Why the kernel programs could not be loaded, attached, read or detached.
///
/// Each message names what the user can change: a build step, a capability, or a setting in
/// the agent's configuration.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The agent was built without its kernel programs.
    #[error(
        "this build has no eBPF object; run `cargo xtask build-ebpf` before building the agent, \
         or set metrics.ebpf.enabled: false"
    )]
    NoObject,
    /// The list of interfaces to attach to was empty.
    #[error("no interface to attach the eBPF programs to; set metrics.ebpf.interfaces")]
    NoInterfaces,
    /// The routing table could not be read to find the default route's interfaces.
    #[error("cannot read {}: {source}; set metrics.ebpf.interfaces", path.display())]
    RouteTable {
        /// The file that could not be read.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Neither routing table has a default route.
    #[error(
        "no default route in {}/net/route or {}/net/ipv6_route to pick interfaces from; \
         set metrics.ebpf.interfaces",
        proc_root.display(),
        proc_root.display()
    )]
    NoDefaultRoute {
        /// The procfs root that was searched.
        proc_root: PathBuf,
    },
    /// The kernel refused because the agent lacks privileges.
    #[error(
        "cannot {action}: permission denied; run the agent as root or grant it CAP_BPF, \
         CAP_NET_ADMIN and CAP_PERFMON, or set metrics.ebpf.enabled: false ({source})"
    )]
    PermissionDenied {
        /// What was refused.
        action: String,
        /// The kernel's answer.
        source: BoxError,
    },
    /// The object could not be parsed or its maps created.
    #[error("cannot load the eBPF object: {source}; rebuild it with `cargo xtask build-ebpf`")]
    Load {
        /// aya's error.
        source: aya::EbpfError,
    },
    /// The object lacks a program or map that the agent expects: it was built from other
    /// sources than the agent.
    #[error(
        "the eBPF object has no {kind} named {name}; rebuild it with `cargo xtask build-ebpf` \
         and then the agent"
    )]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// The name from `plexd-metrics-common`.
        name: &'static str,
    },
    /// The object has the name but not the expected type.
    #[error("the eBPF object's {name} has an unexpected type: {source}; rebuild it with `cargo xtask build-ebpf`")]
    WrongType {
        /// The program or map name.
        name: &'static str,
        /// aya's error.
        source: BoxError,
    },
    /// The verifier (or the kernel) rejected a program.
    #[error("the kernel rejected the eBPF program {program}: {source}")]
    Verify {
        /// The program's name.
        program: &'static str,
        /// aya's error, with the verifier log.
        source: ProgramError,
    },
    /// A configured interface does not exist in the agent's network namespace.
    #[error("cannot attach to {interface}: interface not found; set metrics.ebpf.interfaces")]
    InterfaceNotFound {
        /// The interface name as configured.
        interface: String,
    },
    /// Adding the `clsact` qdisc that netlink attachment needs failed.
    #[error("cannot add a clsact qdisc to {interface}: {source}")]
    Qdisc {
        /// The interface.
        interface: String,
        /// aya's error.
        source: TcError,
    },
    /// Attaching a program to an interface failed.
    #[error("cannot attach {program} to {interface}: {source}")]
    Attach {
        /// The program's name.
        program: &'static str,
        /// The interface.
        interface: String,
        /// aya's error.
        source: ProgramError,
    },
    /// Taking away a program or qdisc failed; something may be left on the interface.
    #[error("cannot detach from {interface}: {source}; check `tc filter show dev {interface}` and `bpftool net`")]
    Detach {
        /// The interface.
        interface: String,
        /// What failed.
        source: BoxError,
    },
    /// A map could not be read.
    #[error("cannot read the eBPF map {map}: {source}")]
    ReadMap {
        /// The map's name from `plexd-metrics-common`.
        map: &'static str,
        /// aya's error.
        source: MapError,
    },
    /// A map could not be written or an entry removed.
    #[error("cannot update the eBPF map {map}: {source}")]
    WriteMap {
        /// The map's name from `plexd-metrics-common`.
        map: &'static str,
        /// aya's error.
        source: MapError,
    },
    /// A stale attachment of an earlier run could not be removed.
    #[error(
        "cannot remove the stale eBPF attachment on {interface} left by an earlier run: \
         {source}; remove it with `tc filter del dev {interface} ingress` / `egress`"
    )]
    Stale {
        /// The interface.
        interface: String,
        /// aya's error.
        source: TcError,
    },
    /// The number of possible CPUs (the size of per-CPU values) is unknown.
    #[error("cannot read {} to count the CPUs: {source}", path.display())]
    Cpus {
        /// The sysfs file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A setting is out of the range the kernel programs support.
    #[error("metrics.ebpf.{key}: {problem}")]
    Setting {
        /// The key below `metrics.ebpf`.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// How the programs hook into TC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links on kernels that have them (6.6 and later), netlink filters on a `clsact`
    /// qdisc before that: the same choice aya makes.
    #[default]
    Auto,
    /// Always netlink filters on a `clsact` qdisc, created if missing and removed again on
    /// drop. For kernels whose TCX misbehaves, and to exercise that path on new kernels.
    Netlink,
}

impl AttachMode {
    fn uses_tcx(self) -> bool {
        match self {
            // aya's own threshold for TCX; an unreadable version means an old, odd kernel.
            Self::Auto => KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)),
            Self::Netlink => false,
        }
    }
}

/// How the kernel programs are loaded and attached: `metrics.ebpf` of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOptions {
    /// TCX or netlink attachment.
    pub mode: AttachMode,
    /// Entries of the per-endpoint map (`metrics.ebpf.max_peers`).
    pub max_endpoints: u32,
    /// Entries of the session map (`metrics.ebpf.max_sessions`).
    pub max_sessions: u32,
    /// How long a hole in a session's counters may stay open before it counts as lost
    /// (`metrics.ebpf.reorder_timeout`).
    pub reorder_timeout: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            mode: AttachMode::Auto,
            max_endpoints: DEFAULT_MAX_ENDPOINTS,
            max_sessions: DEFAULT_MAX_SESSIONS,
            reorder_timeout: Duration::from_nanos(plexd_metrics_common::DEFAULT_REORDER_TIMEOUT_NS),
        }
    }
}

impl ProbeOptions {
    fn reorder_timeout_ns(&self) -> Result<u64, EbpfError> {
        let ns = u64::try_from(self.reorder_timeout.as_nanos()).unwrap_or(u64::MAX);
        if ns == 0 {
            return Err(EbpfError::Setting {
                key: "reorder_timeout",
                problem: "must be greater than 0".to_owned(),
            });
        }
        Ok(ns)
    }
}

/// The WireGuard TC programs, attached to the underlay interfaces.
///
/// Both programs are attached to every interface, ingress and egress. Dropping the probe (or
/// [`UnderlayProbe::detach`], which reports failures) detaches them. Netlink attachments are
/// found through the current thread's network namespace, so drop the probe in the namespace
/// it was attached in; TCX links do not care.
///
/// The probe is the agent's [`EndpointCounterSource`]: call
/// [`EndpointCounterSource::set_listen_ports`] before anything is counted.
pub struct UnderlayProbe {
    // Detached explicitly in Drop, before the fields below close the programs and maps.
    attachments: Vec<Attachment>,
    counters: PerCpuArray<MapData, PacketCounters>,
    reader: Mutex<Reader>,
    ebpf: Ebpf,
}

struct Attachment {
    interface: String,
    ifindex: u32,
    links: Vec<SchedClassifierLink>,
    /// Only a qdisc this probe created is removed: someone else's may carry their filters.
    added_clsact: bool,
}

impl fmt::Debug for UnderlayProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnderlayProbe")
            .field("interfaces", &self.interfaces().collect::<Vec<_>>())
            .field("programs_attached", &self.programs_attached())
            .finish_non_exhaustive()
    }
}

impl UnderlayProbe {
    /// Loads the embedded programs and attaches them to `interfaces` in the way
    /// [`AttachMode::Auto`] picks, with default map sizes and reorder timeout.
    pub fn attach<S: AsRef<str>>(interfaces: &[S]) -> Result<Self, EbpfError> {
        Self::attach_with_options(embedded_object(), interfaces, &ProbeOptions::default())
    }

    /// Loads the programs from `object` (an ELF file as built by `cargo xtask build-ebpf`) and
    /// attaches them to `interfaces` in the given mode, with default map sizes and reorder
    /// timeout. On failure nothing stays attached.
    pub fn attach_with<S: AsRef<str>>(
        object: &[u8],
        interfaces: &[S],
        mode: AttachMode,
    ) -> Result<Self, EbpfError> {
        let options = ProbeOptions {
            mode,
            ..ProbeOptions::default()
        };
        Self::attach_with_options(object, interfaces, &options)
    }

    /// Loads the programs from `object` with `options` and attaches them to `interfaces`.
    ///
    /// Attachments of an earlier run that was killed before it could detach (netlink
    /// filters with this agent's program names) are removed first, so that packets are
    /// not counted twice. On failure nothing stays attached.
    pub fn attach_with_options<S: AsRef<str>>(
        object: &[u8],
        interfaces: &[S],
        options: &ProbeOptions,
    ) -> Result<Self, EbpfError> {
        if object.is_empty() {
            return Err(EbpfError::NoObject);
        }
        let mut seen = HashSet::new();
        let interfaces: Vec<&str> = interfaces
            .iter()
            .map(AsRef::as_ref)
            .filter(|name| seen.insert(*name))
            .collect();
        if interfaces.is_empty() {
            return Err(EbpfError::NoInterfaces);
        }
        // Fail on a typo before anything is loaded, with the setting to change.
        let ifindexes = interfaces
            .iter()
            .map(|name| {
                nix::net::if_::if_nametoindex(*name).map_err(|_| EbpfError::InterfaceNotFound {
                    interface: (*name).to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let timeout_ns = options.reorder_timeout_ns()?;
        for (key, value) in [
            ("max_peers", options.max_endpoints),
            ("max_sessions", options.max_sessions),
        ] {
            if value == 0 {
                return Err(EbpfError::Setting {
                    key,
                    problem: "must be greater than 0".to_owned(),
                });
            }
        }

        raise_memlock_limit();
        let checkpoint = checkpoint_ns(timeout_ns);
        let slots = session_slots(options.max_endpoints);
        let slot_shift = session_slot_shift(slots);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_ENDPOINTS, options.max_endpoints)
            .map_max_entries(MAP_SESSION_SLOTS, slots)
            .map_max_entries(MAP_SESSIONS, options.max_sessions)
            // One announced session per peer is in flight at a time, give or take.
            .map_max_entries(MAP_FRESH_SESSIONS, options.max_endpoints)
            .override_global(GLOBAL_REORDER_TIMEOUT_NS, &timeout_ns, true)
            .override_global(GLOBAL_CHECKPOINT_NS, &checkpoint, true)
            .override_global(GLOBAL_SESSION_SLOT_SHIFT, &slot_shift, true)
            .load(object)
            .map_err(load_error)?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, MAP_PACKET_COUNTERS)?)
            .map_err(|e| wrong_type(MAP_PACKET_COUNTERS, e))?;
        let reader = Reader {
            listen_ports: Array::try_from(take_map(&mut ebpf, MAP_LISTEN_PORTS)?)
                .map_err(|e| wrong_type(MAP_LISTEN_PORTS, e))?,
            endpoints: PerCpuHashMap::try_from(take_map(&mut ebpf, MAP_ENDPOINTS)?)
                .map_err(|e| wrong_type(MAP_ENDPOINTS, e))?,
            session_slots: Array::try_from(take_map(&mut ebpf, MAP_SESSION_SLOTS)?)
                .map_err(|e| wrong_type(MAP_SESSION_SLOTS, e))?,
            sessions: HashMap::try_from(take_map(&mut ebpf, MAP_SESSIONS)?)
                .map_err(|e| wrong_type(MAP_SESSIONS, e))?,
            probe_stats: PerCpuArray::try_from(take_map(&mut ebpf, MAP_PROBE_STATS)?)
                .map_err(|e| wrong_type(MAP_PROBE_STATS, e))?,
            reorder_timeout_ns: timeout_ns,
            cpus: aya::util::nr_cpus().map_err(|(path, source)| EbpfError::Cpus {
                path: PathBuf::from(path),
                source,
            })?,
            state: endpoints::ReadState::default(),
            scratch: Default::default(),
        };
        for name in [PROG_INGRESS, PROG_EGRESS] {
            program(&mut ebpf, name)?
                .load()
                .map_err(|e| verify_error(name, e))?;
        }

        let tcx = options.mode.uses_tcx();
        let mut probe = Self {
            attachments: Vec::with_capacity(interfaces.len()),
            counters,
            reader: Mutex::new(reader),
            ebpf,
        };
        // Each attachment is recorded before the next step can fail, so that an early return
        // drops `probe` and takes back whatever was already done.
        for (interface, ifindex) in interfaces.into_iter().zip(ifindexes) {
            let orphaned_clsact = remove_stale(interface, ifindex)?;
            let added_clsact = if tcx {
                if orphaned_clsact {
                    // Left by the earlier run and empty now: take it away as that run would
                    // have.
                    remove_clsact_if_unused(ifindex).map_err(|e| EbpfError::Detach {
                        interface: interface.to_owned(),
                        source: e.into(),
                    })?;
                }
                false
            } else {
                add_clsact(interface)? || orphaned_clsact
            };
            let Self {
                attachments, ebpf, ..
            } = &mut probe;
            attachments.push(Attachment {
                interface: interface.to_owned(),
                ifindex,
                links: Vec::with_capacity(2),
                added_clsact,
            });
            let current = attachments.len() - 1;
            for (name, direction) in [
                (PROG_INGRESS, Direction::Ingress),
                (PROG_EGRESS, Direction::Egress),
            ] {
                let link = attach_one(ebpf, name, interface, direction, tcx)?;
                attachments[current].links.push(link);
            }
        }
        Ok(probe)
    }

    /// The interfaces the programs are attached to.
    pub fn interfaces(&self) -> impl Iterator<Item = &str> {
        self.attachments.iter().map(|a| a.interface.as_str())
    }

    /// Number of program attachments held: two per interface.
    pub fn programs_attached(&self) -> u64 {
        self.attachments.iter().map(|a| a.links.len() as u64).sum()
    }

    /// Packets and bytes seen since the programs were loaded, summed over all CPUs and
    /// interfaces.
    pub fn totals(&self) -> Result<KernelTotals, EbpfError> {
        let ingress = self.sum(Direction::Ingress)?;
        let egress = self.sum(Direction::Egress)?;
        Ok(KernelTotals {
            programs_attached: self.programs_attached(),
            ingress_packets: ingress.packets,
            ingress_bytes: ingress.bytes,
            egress_packets: egress.packets,
            egress_bytes: egress.bytes,
        })
    }

    fn sum(&self, direction: Direction) -> Result<PacketCounters, EbpfError> {
        let per_cpu = self
            .counters
            .get(&(direction as u32), 0)
            .map_err(|source| EbpfError::ReadMap {
                map: MAP_PACKET_COUNTERS,
                source,
            })?;
        Ok(per_cpu
            .iter()
            .fold(PacketCounters::default(), |acc, c| PacketCounters {
                packets: acc.packets.wrapping_add(c.packets),
                bytes: acc.bytes.wrapping_add(c.bytes),
            }))
    }

    /// Detaches everything, as dropping does, but reports the first failure.
    pub fn detach(mut self) -> Result<(), EbpfError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), EbpfError> {
        let mut first = None;
        for attachment in self.attachments.drain(..) {
            if let Err(e) = attachment.teardown() {
                tracing::warn!(component = "metrics", error = %e, "leaving an eBPF attachment behind");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for UnderlayProbe {
    fn drop(&mut self) {
        // Failures are logged inside; a destructor has nobody to return them to.
        let _ = self.teardown();
    }
}

impl KernelCounters for UnderlayProbe {
    fn read(&self) -> Result<KernelTotals, BoxError> {
        self.totals().map_err(Into::into)
    }
}

impl UnderlayProbe {
    /// Probe-wide counters: map overflows and malformed packets of unknown endpoints.
    pub fn probe_stats(&self) -> Result<ProbeStats, EbpfError> {
        self.lock_reader().probe_stats()
    }

    /// Packets the ingress programs saw on each CPU (index = CPU), all interfaces: shows how
    /// the kernel spreads the traffic.
    pub fn ingress_packets_per_cpu(&self) -> Result<Vec<u64>, EbpfError> {
        let per_cpu = self
            .counters
            .get(&(Direction::Ingress as u32), 0)
            .map_err(|source| EbpfError::ReadMap {
                map: MAP_PACKET_COUNTERS,
                source,
            })?;
        Ok(per_cpu.iter().map(|c| c.packets).collect())
    }

    /// Reads the endpoints as [`EndpointCounterSource::read_endpoints`] does, with its
    /// typed error.
    pub fn snapshot(&self) -> Result<CounterSnapshot, EbpfError> {
        self.lock_reader().read(endpoints::coarse_now_ns())
    }

    /// Reads as [`Self::snapshot`] would `ahead` from now, for tests of what expires (an
    /// endpoint after 15 silent minutes). The reader remembers the read as it does any, so
    /// later reads take it for the latest.
    pub fn snapshot_after(&self, ahead: Duration) -> Result<CounterSnapshot, EbpfError> {
        let ahead_ns = u64::try_from(ahead.as_nanos()).unwrap_or(u64::MAX);
        self.lock_reader()
            .read(endpoints::coarse_now_ns().saturating_add(ahead_ns))
    }

    /// Writes the listen ports as [`EndpointCounterSource::set_listen_ports`] does, with
    /// its typed error.
    pub fn write_listen_ports(&self, ports: &[u16]) -> Result<(), EbpfError> {
        self.lock_reader().set_listen_ports(ports)
    }

    fn lock_reader(&self) -> std::sync::MutexGuard<'_, Reader> {
        // A panic while reading leaves only bookkeeping of past reads behind; carrying on
        // with it is better than never reading again.
        self.reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl EndpointCounterSource for UnderlayProbe {
    fn read_endpoints(&self) -> Result<CounterSnapshot, BoxError> {
        self.snapshot().map_err(Into::into)
    }

    fn set_listen_ports(&self, ports: &[u16]) -> Result<(), BoxError> {
        self.write_listen_ports(ports).map_err(Into::into)
    }

    fn track_endpoints(&self, endpoints: &[std::net::SocketAddr]) -> Result<(), BoxError> {
        self.lock_reader()
            .track_endpoints(endpoints)
            .map_err(Into::into)
    }
}

impl Attachment {
    fn teardown(self) -> Result<(), EbpfError> {
        let detach_error = |source: BoxError| EbpfError::Detach {
            interface: self.interface.clone(),
            source,
        };
        let mut first = None;
        for link in self.links {
            if let Err(e) = link.detach() {
                first.get_or_insert(detach_error(e.into()));
            }
        }
        if self.added_clsact {
            if let Err(e) = remove_clsact_if_unused(self.ifindex) {
                first.get_or_insert(detach_error(e.into()));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|e: ProgramError| EbpfError::WrongType {
            name,
            source: e.into(),
        })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })
}

fn wrong_type(name: &'static str, e: MapError) -> EbpfError {
    EbpfError::WrongType {
        name,
        source: e.into(),
    }
}

/// Removes netlink filters with this agent's program names from `interface`: a run that was
/// killed (SIGKILL, OOM) cannot detach them, and they would count every packet twice.
/// Returns whether any was removed and the `clsact` qdisc is now empty, i.e. orphaned.
///
/// TCX links need no such care: they belong to the file descriptors of the process that
/// made them and go when it dies. TCX programs with these names that are attached anyway
/// belong to a running agent, which is reported and left alone.
fn remove_stale(interface: &str, ifindex: u32) -> Result<bool, EbpfError> {
    let mut removed = false;
    for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
        for name in [PROG_INGRESS, PROG_EGRESS] {
            match tc::qdisc_detach_program(interface, attach_type, name) {
                Ok(()) => {
                    removed = true;
                    tracing::warn!(
                        component = "metrics",
                        interface,
                        program = name,
                        "removed a stale attachment left by an earlier run"
                    );
                }
                Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                // No clsact qdisc: no filters either.
                Err(TcError::NetlinkError(e))
                    if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {}
                Err(source) => {
                    return Err(EbpfError::Stale {
                        interface: interface.to_owned(),
                        source,
                    })
                }
            }
        }
        if let Ok((_, programs)) = SchedClassifier::query_tcx(interface, attach_type) {
            let ours = [PROG_INGRESS, PROG_EGRESS].map(|n| &n[..n.len().min(15)]);
            for p in programs {
                if p.name_as_str().is_some_and(|n| ours.contains(&n)) {
                    tracing::warn!(
                        component = "metrics",
                        interface,
                        program_id = p.id(),
                        "another plexd-metrics seems to be attached here; packets are counted by both"
                    );
                }
            }
        }
    }
    if !removed {
        return Ok(false);
    }
    let nl = RouteNetlink::open().map_err(|e| EbpfError::Detach {
        interface: interface.to_owned(),
        source: e.into(),
    })?;
    let others = nl
        .count_filters(ifindex, CLSACT_INGRESS)
        .and_then(|i| Ok(i + nl.count_filters(ifindex, CLSACT_EGRESS)?))
        .unwrap_or(1);
    Ok(others == 0)
}

fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    interface: &str,
    direction: Direction,
    tcx: bool,
) -> Result<SchedClassifierLink, EbpfError> {
    let attach_type = match direction {
        Direction::Ingress => TcAttachType::Ingress,
        Direction::Egress => TcAttachType::Egress,
    };
    let options = if tcx {
        // Last in the chain: whatever else is attached sees packets before us, as without us.
        TcAttachOptions::TcxOrder(LinkOrder::default())
    } else {
        TcAttachOptions::Netlink(NlOptions::default())
    };
    let attach_error = |source: ProgramError| {
        if errno_of_program_error(&source) == Some(libc::EPERM) {
            EbpfError::PermissionDenied {
                action: format!("attach {name} to {interface}"),
                source: source.into(),
            }
        } else {
            EbpfError::Attach {
                program: name,
                interface: interface.to_owned(),
                source,
            }
        }
    };
    let program = program(ebpf, name)?;
    let id = program
        .attach_with_options(interface, attach_type, options)
        .map_err(attach_error)?;
    // Owning the link lets the probe detach in a known order and see detach errors.
    program.take_link(id).map_err(attach_error)
}

/// Adds a `clsact` qdisc; returns whether this call created it.
fn add_clsact(interface: &str) -> Result<bool, EbpfError> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => Ok(true),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(source) => {
            if matches!(&source, TcError::NetlinkError(e) if e.raw_os_error() == Some(libc::EPERM))
            {
                Err(EbpfError::PermissionDenied {
                    action: format!("add a clsact qdisc to {interface}"),
                    source: source.into(),
                })
            } else {
                Err(EbpfError::Qdisc {
                    interface: interface.to_owned(),
                    source,
                })
            }
        }
    }
}

fn load_error(source: aya::EbpfError) -> EbpfError {
    let errno = match &source {
        aya::EbpfError::MapError(MapError::CreateError { io_error, .. }) => io_error.raw_os_error(),
        aya::EbpfError::BtfError(aya::BtfError::LoadError { io_error, .. }) => {
            io_error.raw_os_error()
        }
        aya::EbpfError::ProgramError(e) => errno_of_program_error(e),
        _ => None,
    };
    if errno == Some(libc::EPERM) {
        EbpfError::PermissionDenied {
            action: "load eBPF maps and programs".to_owned(),
            source: source.into(),
        }
    } else {
        EbpfError::Load { source }
    }
}

fn verify_error(program: &'static str, source: ProgramError) -> EbpfError {
    if errno_of_program_error(&source) == Some(libc::EPERM) {
        EbpfError::PermissionDenied {
            action: format!("load the eBPF program {program}"),
            source: source.into(),
        }
    } else {
        EbpfError::Verify { program, source }
    }
}

// aya wraps its io::Errors transparently, which hides them from `Error::source`; the errno
// has to be dug out by variant.
fn errno_of_program_error(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::LoadError { io_error, .. } => io_error.raw_os_error(),
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        ProgramError::TcError(TcError::NetlinkError(e)) => e.raw_os_error(),
        ProgramError::TcError(TcError::IoError(e)) => e.raw_os_error(),
        ProgramError::NetlinkError(e) => e.raw_os_error(),
        _ => None,
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK, whose default is too small for
/// maps; later kernels use memory cgroups and ignore it.
fn raise_memlock_limit() {
    if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 11, 0)) {
        return;
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::warn!(
            component = "metrics",
            error = %io::Error::last_os_error(),
            "cannot raise RLIMIT_MEMLOCK; loading eBPF maps may fail on this kernel"
        );
    }
}

/// Removes the `clsact` qdisc this probe added, unless filters of other owners were attached
/// to it meanwhile: deleting it would silently take theirs away too.
fn remove_clsact_if_unused(ifindex: u32) -> io::Result<()> {
    let nl = RouteNetlink::open()?;
    let others =
        nl.count_filters(ifindex, CLSACT_INGRESS)? + nl.count_filters(ifindex, CLSACT_EGRESS)?;
    if others > 0 {
        tracing::info!(
            component = "metrics",
            ifindex,
            filters = others,
            "keeping the clsact qdisc: other tc filters use it"
        );
        return Ok(());
    }
    match nl.delete_clsact(ifindex) {
        // Gone already, with its interface or by someone's hand: nothing is left behind.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

// rtnetlink constants from <linux/rtnetlink.h>, <linux/pkt_sched.h> and <linux/netlink.h>;
// spelled out because the libc crate does not carry all of them on every target.
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const TCA_KIND: u16 = 1;
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const CLSACT_HANDLE: u32 = 0xFFFF_0000;
const CLSACT_INGRESS: u32 = 0xFFFF_FFF2;
const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;
const NLMSG_HDRLEN: usize = 16;

/// The few rtnetlink requests aya does not offer: listing filters and deleting a qdisc.
struct RouteNetlink {
    fd: OwnedFd,
    seq: std::cell::Cell<u32>,
}

impl RouteNetlink {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            seq: std::cell::Cell::new(0),
        })
    }

    /// A request carrying a `tcmsg` and optionally a TCA_KIND attribute.
    fn request(
        &self,
        kind: u16,
        flags: u16,
        ifindex: u32,
        handle: u32,
        parent: u32,
        tca_kind: Option<&CStr>,
    ) -> Vec<u8> {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
                                                    // struct tcmsg { u8 family, u8 pad, u16 pad, i32 ifindex, u32 handle, parent, info }
        msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        msg.extend_from_slice(&ifindex.to_ne_bytes());
        msg.extend_from_slice(&handle.to_ne_bytes());
        msg.extend_from_slice(&parent.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        if let Some(value) = tca_kind {
            let value = value.to_bytes_with_nul();
            let len = 4 + value.len();
            msg.extend_from_slice(&(len as u16).to_ne_bytes());
            msg.extend_from_slice(&TCA_KIND.to_ne_bytes());
            msg.extend_from_slice(value);
            msg.resize(msg.len().next_multiple_of(4), 0);
        }
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_ne_bytes());
        msg
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: msg is a valid buffer of msg.len() bytes for the duration of the call.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives replies until the request is done, calling `on_message` with the type of
    /// each message that is not an error or the end of a dump.
    fn receive(&self, mut on_message: impl FnMut(u16)) -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: buf is a valid, writable buffer of buf.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = rest
                            .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or_else(|| {
                                io::Error::new(io::ErrorKind::InvalidData, "short netlink error")
                            })?;
                        // An error message with code 0 is the acknowledgement.
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    other => on_message(other),
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }

    fn count_filters(&self, ifindex: u32, parent: u32) -> io::Result<usize> {
        self.send(&self.request(RTM_GETTFILTER, NLM_F_DUMP, ifindex, 0, parent, None))?;
        let mut count = 0;
        self.receive(|kind| count += usize::from(kind == RTM_NEWTFILTER))?;
        Ok(count)
    }

    fn delete_clsact(&self, ifindex: u32) -> io::Result<()> {
        self.send(&self.request(
            RTM_DELQDISC,
            NLM_F_ACK,
            ifindex,
            CLSACT_HANDLE,
            TC_H_CLSACT,
            Some(c"clsact"),
        ))?;
        self.receive(|_| ())
    }
}

/// Names of the interfaces that carry a default route, IPv4 first, without duplicates and
/// without `lo`.
///
/// Reads `<proc_root>/net/route` and `<proc_root>/net/ipv6_route` (the latter may be missing
/// when IPv6 is off). The agent attaches to these when `metrics.ebpf.interfaces` is empty,
/// because WireGuard's encrypted traffic leaves through them.
pub fn default_route_interfaces(proc_root: &Path) -> Result<Vec<String>, EbpfError> {
    let read = |name: &str| -> Result<String, EbpfError> {
        let path = proc_root.join("net").join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(EbpfError::RouteTable { path, source }),
        }
    };
    let mut names = ipv4_default_interfaces(&read("route")?);
    names.extend(ipv6_default_interfaces(&read("ipv6_route")?));
    let mut seen = HashSet::new();
    names.retain(|name| name != "lo" && seen.insert(name.clone()));
    if names.is_empty() {
        return Err(EbpfError::NoDefaultRoute {
            proc_root: proc_root.to_owned(),
        });
    }
    Ok(names)
}

// Route flags from <linux/route.h>: a route must be up, and "reject" routes (unreachable,
// prohibit) carry no traffic.
const RTF_UP: u32 = 0x0001;
const RTF_REJECT: u32 = 0x0200;

/// `/proc/net/route`: a header line, then tab-separated `Iface Destination Gateway Flags
/// RefCnt Use Metric Mask ...` with hexadecimal destination, flags and mask.
fn ipv4_default_interfaces(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (iface, destination, flags, mask) = (
                fields.first()?,
                fields.get(1)?,
                fields.get(3)?,
                fields.get(7)?,
            );
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let is_default = u32::from_str_radix(destination, 16).ok()? == 0
                && u32::from_str_radix(mask, 16).ok()? == 0;
            (is_default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0)
                .then(|| (*iface).to_owned())
        })
        .collect()
}

/// `/proc/net/ipv6_route`: no header; space-separated `dest dest_len src src_len next_hop
/// metric refcnt use flags iface`, all hexadecimal except the interface name.
fn ipv6_default_interfaces(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                return None;
            }
            let is_default = fields[0].bytes().all(|b| b == b'0')
                && u8::from_str_radix(fields[1], 16).ok()? == 0;
            let flags = u32::from_str_radix(fields[8], 16).ok()?;
            (is_default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0)
                .then(|| fields[9].to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
wg0\t0000640A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0
down0\t00000000\t0103A8C0\t0002\t0\t0\t300\t00000000\t0\t0\t0
";

    const IPV6_ROUTE: &str = "\
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth2
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001       lo
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";

    #[test]
    fn ipv4_default_routes_that_are_up() {
        assert_eq!(ipv4_default_interfaces(ROUTE), ["eth0", "eth1"]);
    }

    #[test]
    fn ipv4_header_only_has_none() {
        assert!(ipv4_default_interfaces(ROUTE.lines().next().unwrap()).is_empty());
    }

    #[test]
    fn ipv6_default_routes_skip_prefixes_and_reject_routes() {
        assert_eq!(ipv6_default_interfaces(IPV6_ROUTE), ["eth2", "eth0"]);
    }

    #[test]
    fn garbage_lines_are_ignored() {
        assert!(ipv4_default_interfaces("Iface\nnot a route\n\n").is_empty());
        assert!(ipv6_default_interfaces("short line\nzz 00 a b c d e f g h\n").is_empty());
    }

    fn fixture(route: Option<&str>, ipv6_route: Option<&str>) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "plexd-metrics-proc-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let net = root.join("net");
        std::fs::create_dir_all(&net).unwrap();
        if let Some(text) = route {
            std::fs::write(net.join("route"), text).unwrap();
        }
        if let Some(text) = ipv6_route {
            std::fs::write(net.join("ipv6_route"), text).unwrap();
        }
        root
    }

    #[test]
    fn both_tables_merged_in_order_without_duplicates_or_lo() {
        let root = fixture(Some(ROUTE), Some(IPV6_ROUTE));
        assert_eq!(
            default_route_interfaces(&root).unwrap(),
            ["eth0", "eth1", "eth2"]
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn missing_ipv6_table_is_fine() {
        let root = fixture(Some(ROUTE), None);
        assert_eq!(default_route_interfaces(&root).unwrap(), ["eth0", "eth1"]);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn no_default_route_says_what_to_set() {
        let root = fixture(Some(ROUTE.lines().next().unwrap()), None);
        let err = default_route_interfaces(&root).unwrap_err();
        assert!(matches!(err, EbpfError::NoDefaultRoute { .. }));
        assert!(
            err.to_string().ends_with("set metrics.ebpf.interfaces"),
            "{err}"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn unreadable_table_names_the_file() {
        // A directory where the file should be: read_to_string fails with something other
        // than NotFound.
        let root = fixture(None, None);
        std::fs::create_dir_all(root.join("net").join("route")).unwrap();
        let err = default_route_interfaces(&root).unwrap_err();
        assert!(matches!(err, EbpfError::RouteTable { .. }), "{err:?}");
        assert!(err.to_string().contains("net/route"), "{err}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn empty_object_and_unknown_interface_are_explained_before_any_syscall_to_bpf() {
        let err = UnderlayProbe::attach_with(&[], &["eth0"], AttachMode::Auto).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this build has no eBPF object; run `cargo xtask build-ebpf` before building the agent, \
             or set metrics.ebpf.enabled: false"
        );
        let err =
            UnderlayProbe::attach_with(b"\x7fELF", &["no-such-if0"], AttachMode::Auto).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot attach to no-such-if0: interface not found; set metrics.ebpf.interfaces"
        );
        let none: [&str; 0] = [];
        let err = UnderlayProbe::attach_with(b"\x7fELF", &none, AttachMode::Auto).unwrap_err();
        assert!(matches!(err, EbpfError::NoInterfaces));
    }

    #[test]
    fn netlink_requests_are_well_formed() {
        // Building a request needs no socket; any descriptor will do.
        let nl = RouteNetlink {
            fd: std::fs::File::open("/dev/null").unwrap().into(),
            seq: std::cell::Cell::new(0),
        };
        let msg = nl.request(
            RTM_DELQDISC,
            NLM_F_ACK,
            7,
            CLSACT_HANDLE,
            TC_H_CLSACT,
            Some(c"clsact"),
        );
        assert_eq!(msg.len(), 16 + 20 + 4 + 8);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(
            u16::from_ne_bytes(msg[4..6].try_into().unwrap()),
            RTM_DELQDISC
        );
        assert_eq!(i32::from_ne_bytes(msg[20..24].try_into().unwrap()), 7);
        assert_eq!(&msg[40..47], b"clsact\0");
    }
}
