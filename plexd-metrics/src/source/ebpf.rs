//! Loading and attaching the kernel programs, and reading their maps.
//!
//! [`UnderlayProbe`] owns everything it puts into the kernel: the programs, their attachments
//! and, on kernels without TCX, any `clsact` qdisc it had to create. Dropping it takes all of
//! that away again, so an agent that stops (or a test that fails) leaves the node's interfaces
//! as it found them.

mod batch;
mod clsact;
mod endpoints;

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::PathBuf;
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
    MAP_PACKET_COUNTERS, MAP_PROBATION, MAP_PROBE_STATS, MAP_SESSIONS, MAP_SESSION_SLOTS,
    PROG_EGRESS, PROG_INGRESS,
};

use crate::accounting::counters::CounterSnapshot;
use crate::accounting::sessions::ProbeStats;
use crate::collector::{BoxError, KernelCounters, KernelTotals};
use crate::source::counters::EndpointCounterSource;
use crate::source::netlink::NetlinkError;
use clsact::ClsactNetlink;
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
            // Sessions out of probation may only take a free slot.
            .map_max_entries(MAP_PROBATION, slots)
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
            ledger: crate::accounting::sessions::SessionLedger::default(),
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
    let mut nl = ClsactNetlink::open().map_err(|e| EbpfError::Detach {
        interface: interface.to_owned(),
        source: e.into(),
    })?;
    // Unknown counts as used: a qdisc of someone else's is never deleted.
    let others = nl.filter_count(ifindex).unwrap_or(1);
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
fn remove_clsact_if_unused(ifindex: u32) -> Result<(), NetlinkError> {
    let mut nl = ClsactNetlink::open()?;
    let others = nl.filter_count(ifindex)?;
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
        Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
