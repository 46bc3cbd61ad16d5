//! ICMP and ICMPv6 echo over the mesh interface, for the `latency` group.
//!
//! One socket per address family ([`socket`]) carries the probes to every peer, and one
//! receive task per socket hands each reply to the probe waiting for it, matched by the
//! probe table of `accounting::icmp` (sequence number, source address and a per-pinger
//! cookie in the payload). Unprivileged ICMP datagram sockets are
//! used where `net.ipv4.ping_group_range` admits the agent's group; otherwise raw sockets,
//! which need CAP_NET_RAW.
//!
//! Written on `nix` rather than a ping crate: the ping crates reviewed (surge-ping, ping-rs,
//! fastping-rs) take the receive time in userspace and ignore ICMP errors, while the issue
//! asks for kernel receive timestamps (SO_TIMESTAMPNS) and for unreachable/time-exceeded
//! messages to end a probe at once, which needs the socket error queue (IP_RECVERR) on
//! datagram sockets and parsing the quoted packet on raw ones.

mod socket;

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::accounting::icmp::Family;
use socket::{open_socket, ProbeSocket};

/// Which kind of ICMP socket to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SocketChoice {
    /// A datagram socket if `net.ipv4.ping_group_range` allows it, a raw socket otherwise.
    #[default]
    Auto,
    /// Only an unprivileged ICMP datagram socket.
    Datagram,
    /// Only a raw socket (CAP_NET_RAW).
    Raw,
}

/// The kind of socket a family ended up with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// `SOCK_DGRAM` with `IPPROTO_ICMP(V6)`: the kernel picks the identifier and checksum and
    /// delivers only this socket's replies.
    Datagram,
    /// `SOCK_RAW`: every ICMP message arrives; the pinger filters by identifier and cookie.
    Raw,
}

/// How to open the pinger's sockets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IcmpOptions {
    /// Bind both sockets to this interface (SO_BINDTODEVICE); `None` lets routing decide.
    pub interface: Option<String>,
    /// Datagram, raw, or whichever is allowed.
    pub socket: SocketChoice,
}

/// Why a probe or the pinger failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum IcmpError {
    /// Neither kind of socket could be opened for a family.
    #[error(
        "cannot open an {family} socket{bound}: datagram: {datagram}; raw: {raw}. \
         Allow the agent's group in net.ipv4.ping_group_range (e.g. `sysctl -w \
         net.ipv4.ping_group_range=\"0 2147483647\"`) or grant it CAP_NET_RAW"
    )]
    Open {
        /// `ICMP` or `ICMPv6`.
        family: &'static str,
        /// ` bound to <interface>`, or empty.
        bound: String,
        /// Why the datagram socket failed (or that it was not tried).
        datagram: String,
        /// Why the raw socket failed (or that it was not tried).
        raw: String,
    },
    /// The socket exists, but binding it to the mesh interface failed.
    #[error(
        "cannot bind the {family} socket to interface {interface:?}: {source}; \
         set metrics.latency.interface to the mesh interface (see `ip link`)"
    )]
    Bind {
        /// `ICMP` or `ICMPv6`.
        family: &'static str,
        /// The configured interface.
        interface: String,
        /// What the kernel said.
        source: Errno,
    },
    /// This family has no socket (it failed to open earlier).
    #[error("no {family} socket: {reason}")]
    Unavailable {
        /// `ICMP` or `ICMPv6`.
        family: &'static str,
        /// Why it could not be opened.
        reason: String,
    },
    /// The kernel refused to send the echo request (a local route says unreachable, the
    /// interface is down, ...).
    #[error("cannot send an echo request to {addr}: {source}")]
    Send {
        /// The probe's destination.
        addr: IpAddr,
        /// What the kernel said.
        source: Errno,
    },
    /// An ICMP error came back instead of a reply.
    #[error("{addr}: {what} (ICMP type {icmp_type} code {code}, from {from})")]
    Unreachable {
        /// The probe's destination.
        addr: IpAddr,
        /// The router or host that answered with the error.
        from: IpAddr,
        /// ICMP(v6) type of the error.
        icmp_type: u8,
        /// ICMP(v6) code of the error.
        code: u8,
        /// The type and code in words.
        what: &'static str,
    },
    /// More probes of one family are waiting than sequence numbers exist.
    #[error("too many probes in flight ({0}); lower metrics.latency.probes or the peer count")]
    Busy(usize),
    /// The receive loop stopped; the socket is unusable until the pinger is reopened.
    #[error("the ICMP receive loop stopped: {0}")]
    Closed(String),
}

/// Counters of what the receive loops saw, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpStats {
    /// Replies matched to a waiting probe.
    pub replies: u64,
    /// ICMP errors matched to a waiting probe.
    pub errors: u64,
    /// Replies to this pinger's probes that no probe waits for any more: duplicates, or
    /// late replies after a timeout.
    pub late_or_duplicate: u64,
    /// ICMP messages that are not replies to this pinger (another pinger's, forged, or
    /// unrelated errors); only raw sockets see these.
    pub stray: u64,
}

/// What the receive loops saw, shared by the sockets of a pinger.
#[derive(Default)]
struct ReceiveCounts {
    replies: AtomicU64,
    errors: AtomicU64,
    late_or_duplicate: AtomicU64,
    stray: AtomicU64,
}

type Outcome = Result<Duration, IcmpError>;

/// Aborts the receive task when the pinger goes, which closes the socket.
struct ReceiveTask(JoinHandle<()>);

impl Drop for ReceiveTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A family's socket, or why there is none.
struct FamilySocket {
    socket: Result<(Arc<ProbeSocket>, ReceiveTask), IcmpError>,
}

/// Sends ICMP(v6) echo requests and measures their round trips with kernel timestamps.
pub struct IcmpPinger {
    options: IcmpOptions,
    families: [Mutex<FamilySocket>; 2],
    cookie: u64,
    counts: Arc<ReceiveCounts>,
}

impl IcmpPinger {
    /// Opens one socket per family in the calling thread's network namespace and starts their
    /// receive tasks. Must run inside a tokio runtime. Fails only when neither family has a
    /// socket; a family that failed alone makes its probes fail with the reason.
    pub fn open(options: &IcmpOptions) -> Result<Self, IcmpError> {
        let cookie = random_u64();
        let counts = Arc::new(ReceiveCounts::default());
        let v4 = open_socket(Family::V4, options, cookie, &counts);
        let v6 = open_socket(Family::V6, options, cookie, &counts);
        if let (Err(e), Err(_)) = (&v4, &v6) {
            return Err(e.clone());
        }
        for (family, e) in [(Family::V4, &v4), (Family::V6, &v6)] {
            match e {
                Ok((ep, _)) => info!(
                    component = "metrics",
                    family = family.name(),
                    socket = ?ep.kind,
                    interface = options.interface.as_deref().unwrap_or(""),
                    "latency probes ready"
                ),
                Err(e) => {
                    warn!(component = "metrics", family = family.name(), error = %e, "latency probes unavailable for this family")
                }
            }
        }
        Ok(Self {
            options: options.clone(),
            families: [
                Mutex::new(FamilySocket { socket: v4 }),
                Mutex::new(FamilySocket { socket: v6 }),
            ],
            cookie,
            counts,
        })
    }

    /// The kind of socket `IPv4` (`v6 == false`) or IPv6 probes use, if that family has one.
    pub fn socket_kind(&self, v6: bool) -> Option<SocketKind> {
        let family = if v6 { Family::V6 } else { Family::V4 };
        self.socket(family).ok().map(|ps| ps.kind)
    }

    /// What the receive loops have seen so far.
    pub fn stats(&self) -> IcmpStats {
        let c = &self.counts;
        IcmpStats {
            replies: c.replies.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            late_or_duplicate: c.late_or_duplicate.load(Ordering::Relaxed),
            stray: c.stray.load(Ordering::Relaxed),
        }
    }

    /// Probes waiting for an answer right now, over both families.
    pub fn in_flight(&self) -> usize {
        [Family::V4, Family::V6]
            .iter()
            .filter_map(|f| self.socket(*f).ok())
            .map(|ps| ps.lock().len())
            .sum()
    }

    /// Reopens a family whose socket failed or went bad (its interface was recreated, say),
    /// in the calling thread's namespace. Errors only when no family works afterwards.
    pub fn reopen_broken(&self) -> Result<(), IcmpError> {
        let mut last = None;
        let mut working = 0;
        for family in [Family::V4, Family::V6] {
            let mut slot = self.families[index(family)]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let healthy = matches!(&slot.socket,
                Ok((ps, task)) if !task.0.is_finished() && !ps.is_broken());
            if healthy {
                working += 1;
                continue;
            }
            match open_socket(family, &self.options, self.cookie, &self.counts) {
                Ok(opened) => {
                    info!(
                        component = "metrics",
                        family = family.name(),
                        "latency socket reopened"
                    );
                    slot.socket = Ok(opened);
                    working += 1;
                }
                Err(e) => {
                    last = Some(e.clone());
                    slot.socket = Err(e);
                }
            }
        }
        match (working, last) {
            (0, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    fn socket(&self, family: Family) -> Result<Arc<ProbeSocket>, IcmpError> {
        let slot = self.families[index(family)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &slot.socket {
            Ok((ps, _)) => Ok(ps.clone()),
            Err(e) => Err(IcmpError::Unavailable {
                family: family.name(),
                reason: e.to_string(),
            }),
        }
    }

    /// Sends one echo request to `addr` and waits for its reply or an ICMP error. Never
    /// times out by itself: the caller bounds the wait, and dropping the future forgets the
    /// probe.
    pub async fn probe(&self, addr: IpAddr) -> Result<Duration, IcmpError> {
        let ps = self.socket(Family::of(addr))?;
        let (tx, rx) = oneshot::channel();
        let (seq, serial) = ps.register(addr, tx)?;
        let _forget = Forget {
            socket: &ps,
            seq,
            serial,
        };
        ps.send(addr, seq, serial).await?;
        match rx.await {
            Ok(outcome) => outcome,
            Err(_) => Err(IcmpError::Closed("the probe was dropped".into())),
        }
    }
}

/// Removes a probe that ended without an answer (timeout, send error, cancellation), so the
/// table holds only live probes.
struct Forget<'a> {
    socket: &'a ProbeSocket,
    seq: u16,
    serial: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.socket.lock().forget(self.seq, self.serial);
    }
}

/// A family's place in [`IcmpPinger::families`].
fn index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// Random enough for a cookie and an identifier: `RandomState` is seeded from the OS's
/// random source, and no extra crate is needed.
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_errors_name_the_destination_the_reason_and_the_router() {
        let e = IcmpError::Unreachable {
            addr: "10.77.0.5".parse().unwrap(),
            from: "10.201.0.2".parse().unwrap(),
            icmp_type: 3,
            code: 1,
            what: "host unreachable",
        };
        assert_eq!(
            e.to_string(),
            "10.77.0.5: host unreachable (ICMP type 3 code 1, from 10.201.0.2)"
        );
    }
}
