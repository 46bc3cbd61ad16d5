//! ICMP and ICMPv6 echo over the mesh interface, for the `latency` group.
//!
//! One socket per address family carries the probes to every peer, and one receive task per
//! socket hands each reply to the probe waiting for it (matched by sequence number, source
//! address and a per-pinger cookie in the payload). Unprivileged ICMP datagram sockets are
//! used where `net.ipv4.ping_group_range` admits the agent's group; otherwise raw sockets,
//! which need CAP_NET_RAW.
//!
//! Written on `nix` rather than a ping crate: the ping crates reviewed (surge-ping, ping-rs,
//! fastping-rs) take the receive time in userspace and ignore ICMP errors, while the issue
//! asks for kernel receive timestamps (SO_TIMESTAMPNS) and for unreachable/time-exceeded
//! messages to end a probe at once, which needs the socket error queue (IP_RECVERR) on
//! datagram sockets and parsing the quoted packet on raw ones.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmsg, sendto, setsockopt, socket, sockopt, AddressFamily, ControlMessageOwned, MsgFlags,
    SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use nix::time::{clock_gettime, ClockId};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Bytes after the 8-byte ICMP header, as `ping` and `fping` send by default.
const PAYLOAD_LEN: usize = 56;
const PACKET_LEN: usize = 8 + PAYLOAD_LEN;
/// Payload bytes that identify a probe: cookie, serial, send time.
const STAMP_LEN: usize = 24;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_PARAMETER_PROBLEM: u8 = 4;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;

/// `linux/icmp.h` and `linux/icmpv6.h`: the per-type receive filters of raw sockets.
const ICMP_FILTER: libc::c_int = 1;
const ICMPV6_FILTER: libc::c_int = 1;

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

#[derive(Default)]
struct Counters {
    replies: AtomicU64,
    errors: AtomicU64,
    late_or_duplicate: AtomicU64,
    stray: AtomicU64,
}

/// IPv4 or IPv6, with what differs between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "ICMP",
            Family::V6 => "ICMPv6",
        }
    }
    fn echo_request(self) -> u8 {
        match self {
            Family::V4 => ICMP_ECHO_REQUEST,
            Family::V6 => ICMP6_ECHO_REQUEST,
        }
    }
    fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }
    fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

type Outcome = Result<Duration, IcmpError>;

/// A probe waiting for its reply.
struct Waiter {
    serial: u64,
    addr: IpAddr,
    registered: Instant,
    tx: oneshot::Sender<Outcome>,
}

/// Waiting probes by sequence number.
struct Pending {
    next_seq: u16,
    waiters: HashMap<u16, Waiter>,
}

/// One open socket and the probes waiting on it.
struct Endpoint {
    fd: AsyncFd<OwnedFd>,
    family: Family,
    kind: SocketKind,
    /// The identifier raw sockets put into requests and expect in replies.
    ident: u16,
    cookie: u64,
    ifindex: u32,
    pending: Mutex<Pending>,
    next_serial: AtomicU64,
    counters: Arc<Counters>,
    /// Set when the bound interface went away: the socket stays bound to the old interface
    /// index, so it has to be replaced (see [`IcmpPinger::reopen_broken`]).
    broken: AtomicBool,
}

/// Aborts the receive task when the pinger goes, which closes the socket.
struct ReceiveTask(JoinHandle<()>);

impl Drop for ReceiveTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A family's socket, or why there is none.
struct Slot {
    endpoint: Result<(Arc<Endpoint>, ReceiveTask), IcmpError>,
}

/// Sends ICMP(v6) echo requests and measures their round trips with kernel timestamps.
pub struct IcmpPinger {
    options: IcmpOptions,
    slots: [Mutex<Slot>; 2],
    cookie: u64,
    counters: Arc<Counters>,
}

impl IcmpPinger {
    /// Opens one socket per family in the calling thread's network namespace and starts their
    /// receive tasks. Must run inside a tokio runtime. Fails only when neither family has a
    /// socket; a family that failed alone makes its probes fail with the reason.
    pub fn open(options: &IcmpOptions) -> Result<Self, IcmpError> {
        let cookie = random_u64();
        let counters = Arc::new(Counters::default());
        let v4 = open_endpoint(Family::V4, options, cookie, &counters);
        let v6 = open_endpoint(Family::V6, options, cookie, &counters);
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
            slots: [
                Mutex::new(Slot { endpoint: v4 }),
                Mutex::new(Slot { endpoint: v6 }),
            ],
            cookie,
            counters,
        })
    }

    /// The kind of socket `IPv4` (`v6 == false`) or IPv6 probes use, if that family has one.
    pub fn socket_kind(&self, v6: bool) -> Option<SocketKind> {
        let family = if v6 { Family::V6 } else { Family::V4 };
        self.endpoint(family).ok().map(|ep| ep.kind)
    }

    /// What the receive loops have seen so far.
    pub fn stats(&self) -> IcmpStats {
        let c = &self.counters;
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
            .filter_map(|f| self.endpoint(*f).ok())
            .map(|ep| ep.lock().waiters.len())
            .sum()
    }

    /// Reopens a family whose socket failed or went bad (its interface was recreated, say),
    /// in the calling thread's namespace. Errors only when no family works afterwards.
    pub fn reopen_broken(&self) -> Result<(), IcmpError> {
        let mut last = None;
        let mut working = 0;
        for family in [Family::V4, Family::V6] {
            let mut slot = self.slots[family.index()]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let healthy = matches!(&slot.endpoint,
                Ok((ep, task)) if !task.0.is_finished() && !ep.broken.load(Ordering::Relaxed));
            if healthy {
                working += 1;
                continue;
            }
            match open_endpoint(family, &self.options, self.cookie, &self.counters) {
                Ok(ep) => {
                    info!(
                        component = "metrics",
                        family = family.name(),
                        "latency socket reopened"
                    );
                    slot.endpoint = Ok(ep);
                    working += 1;
                }
                Err(e) => {
                    last = Some(e.clone());
                    slot.endpoint = Err(e);
                }
            }
        }
        match (working, last) {
            (0, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    fn endpoint(&self, family: Family) -> Result<Arc<Endpoint>, IcmpError> {
        let slot = self.slots[family.index()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &slot.endpoint {
            Ok((ep, _)) => Ok(ep.clone()),
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
        let ep = self.endpoint(Family::of(addr))?;
        let (tx, rx) = oneshot::channel();
        let (seq, serial) = ep.register(addr, tx)?;
        let _forget = Forget {
            ep: &ep,
            seq,
            serial,
        };
        ep.send(addr, seq, serial).await?;
        match rx.await {
            Ok(outcome) => outcome,
            Err(_) => Err(IcmpError::Closed("the probe was dropped".into())),
        }
    }
}

/// Removes a probe that ended without an answer (timeout, send error, cancellation), so the
/// table holds only live probes.
struct Forget<'a> {
    ep: &'a Endpoint,
    seq: u16,
    serial: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut pending = self.ep.lock();
        if pending
            .waiters
            .get(&self.seq)
            .is_some_and(|w| w.serial == self.serial)
        {
            pending.waiters.remove(&self.seq);
        }
    }
}

fn open_endpoint(
    family: Family,
    options: &IcmpOptions,
    cookie: u64,
    counters: &Arc<Counters>,
) -> Result<(Arc<Endpoint>, ReceiveTask), IcmpError> {
    let bound = options
        .interface
        .as_deref()
        .map(|i| format!(" bound to {i}"))
        .unwrap_or_default();
    let not_tried = || "not tried".to_owned();
    let (fd, kind) = match options.socket {
        SocketChoice::Datagram => match new_socket(family, SocketKind::Datagram) {
            Ok(fd) => (fd, SocketKind::Datagram),
            Err(e) => {
                return Err(IcmpError::Open {
                    family: family.name(),
                    bound,
                    datagram: describe_open_error(e, SocketKind::Datagram),
                    raw: not_tried(),
                })
            }
        },
        SocketChoice::Raw => match new_socket(family, SocketKind::Raw) {
            Ok(fd) => (fd, SocketKind::Raw),
            Err(e) => {
                return Err(IcmpError::Open {
                    family: family.name(),
                    bound,
                    datagram: not_tried(),
                    raw: describe_open_error(e, SocketKind::Raw),
                })
            }
        },
        SocketChoice::Auto => match new_socket(family, SocketKind::Datagram) {
            Ok(fd) => (fd, SocketKind::Datagram),
            Err(dgram) => match new_socket(family, SocketKind::Raw) {
                Ok(fd) => {
                    debug!(component = "metrics", family = family.name(), error = %dgram, "ICMP datagram socket not allowed; using a raw socket");
                    (fd, SocketKind::Raw)
                }
                Err(raw) => {
                    return Err(IcmpError::Open {
                        family: family.name(),
                        bound,
                        datagram: describe_open_error(dgram, SocketKind::Datagram),
                        raw: describe_open_error(raw, SocketKind::Raw),
                    })
                }
            },
        },
    };

    let mut ifindex = 0;
    if let Some(interface) = &options.interface {
        setsockopt(
            &fd,
            sockopt::BindToDevice,
            &std::ffi::OsString::from(interface),
        )
        .map_err(|source| IcmpError::Bind {
            family: family.name(),
            interface: interface.clone(),
            source,
        })?;
        ifindex = nix::net::if_::if_nametoindex(interface.as_str()).unwrap_or(0);
    }
    configure(&fd, family, kind).map_err(|e| IcmpError::Open {
        family: family.name(),
        bound: String::new(),
        datagram: format!("socket options: {e}"),
        raw: format!("socket options: {e}"),
    })?;
    // SAFETY: an OwnedFd is a valid open descriptor, the AsyncFd owns it from here on, and
    // its `as_raw_fd` always returns that same descriptor.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::ERROR) }
        .map_err(|e| {
        IcmpError::Closed(format!("cannot register the socket with the runtime: {e}"))
    })?;
    let ep = Arc::new(Endpoint {
        fd,
        family,
        kind,
        ident: (random_u64() & 0xffff) as u16,
        cookie,
        ifindex,
        pending: Mutex::new(Pending {
            next_seq: (random_u64() & 0xffff) as u16,
            waiters: HashMap::new(),
        }),
        next_serial: AtomicU64::new(1),
        counters: counters.clone(),
        broken: AtomicBool::new(false),
    });
    let task = tokio::spawn(receive_loop(ep.clone()));
    Ok((ep, ReceiveTask(task)))
}

fn new_socket(family: Family, kind: SocketKind) -> Result<OwnedFd, Errno> {
    let (af, proto) = match family {
        Family::V4 => (AddressFamily::Inet, SockProtocol::Icmp),
        Family::V6 => (AddressFamily::Inet6, SockProtocol::IcmpV6),
    };
    let ty = match kind {
        SocketKind::Datagram => SockType::Datagram,
        SocketKind::Raw => SockType::Raw,
    };
    socket(
        af,
        ty,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        proto,
    )
}

fn describe_open_error(e: Errno, kind: SocketKind) -> String {
    match (kind, e) {
        (SocketKind::Datagram, Errno::EACCES) => {
            "the agent's group is outside net.ipv4.ping_group_range".to_owned()
        }
        (SocketKind::Raw, Errno::EPERM) => "CAP_NET_RAW is missing".to_owned(),
        (_, e) => e.desc().to_owned(),
    }
}

fn configure(fd: &OwnedFd, family: Family, kind: SocketKind) -> Result<(), Errno> {
    setsockopt(fd, sockopt::ReceiveTimestampns, &true)?;
    // Room for a few thousand replies should the receive task fall behind; the forced size
    // needs CAP_NET_ADMIN, the plain one is capped by net.core.rmem_max.
    let want = 1 << 20;
    if setsockopt(fd, sockopt::RcvBufForce, &want).is_err() {
        let _ = setsockopt(fd, sockopt::RcvBuf, &want);
    }
    match (kind, family) {
        // Datagram sockets learn of ICMP errors only through the error queue.
        (SocketKind::Datagram, Family::V4) => setsockopt(fd, sockopt::Ipv4RecvErr, &true)?,
        (SocketKind::Datagram, Family::V6) => setsockopt(fd, sockopt::Ipv6RecvErr, &true)?,
        // Raw sockets get a copy of every ICMP message; the kernel drops the types the
        // pinger has no use for before they cost a wake-up.
        (SocketKind::Raw, Family::V4) => {
            let wanted = [
                ICMP_ECHO_REPLY,
                ICMP_DEST_UNREACH,
                ICMP_TIME_EXCEEDED,
                ICMP_PARAMETER_PROBLEM,
            ];
            let block: u32 = !wanted.iter().fold(0u32, |m, t| m | 1 << t);
            raw_setsockopt(fd, libc::SOL_RAW, ICMP_FILTER, &block)?;
        }
        (SocketKind::Raw, Family::V6) => {
            let wanted = [
                ICMP6_DEST_UNREACH,
                ICMP6_PACKET_TOO_BIG,
                ICMP6_TIME_EXCEEDED,
                ICMP6_PARAMETER_PROBLEM,
                ICMP6_ECHO_REPLY,
            ];
            // A set bit blocks that type.
            let mut block = [u32::MAX; 8];
            for t in wanted {
                block[usize::from(t) / 32] &= !(1u32 << (t % 32));
            }
            raw_setsockopt(fd, libc::IPPROTO_ICMPV6, ICMPV6_FILTER, &block)?;
        }
    }
    Ok(())
}

/// The ICMP type filters are not among nix's socket options.
fn raw_setsockopt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> Result<(), Errno> {
    // SAFETY: `value` is a live, initialised `T` for the duration of the call, and its size
    // is passed along; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map(drop)
}

impl Endpoint {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves a sequence number for a probe to `addr`.
    fn register(
        &self,
        addr: IpAddr,
        tx: oneshot::Sender<Outcome>,
    ) -> Result<(u16, u64), IcmpError> {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.lock();
        let in_flight = pending.waiters.len();
        if in_flight >= usize::from(u16::MAX) {
            return Err(IcmpError::Busy(in_flight));
        }
        let mut seq = pending.next_seq;
        while pending.waiters.contains_key(&seq) {
            seq = seq.wrapping_add(1);
        }
        pending.next_seq = seq.wrapping_add(1);
        pending.waiters.insert(
            seq,
            Waiter {
                serial,
                addr,
                registered: Instant::now(),
                tx,
            },
        );
        Ok((seq, serial))
    }

    fn packet(&self, seq: u16, serial: u64) -> [u8; PACKET_LEN] {
        let mut p = [0u8; PACKET_LEN];
        p[0] = self.family.echo_request();
        // Datagram sockets overwrite the identifier with their own and fill in the checksum.
        p[4..6].copy_from_slice(&self.ident.to_be_bytes());
        p[6..8].copy_from_slice(&seq.to_be_bytes());
        p[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        p[16..24].copy_from_slice(&serial.to_be_bytes());
        for (i, b) in p[8 + STAMP_LEN..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    async fn send(&self, addr: IpAddr, seq: u16, serial: u64) -> Result<(), IcmpError> {
        let mut packet = self.packet(seq, serial);
        loop {
            // The send time goes into the payload right before the system call, as late as
            // the packet allows; the reply brings it back.
            packet[24..32].copy_from_slice(&realtime_nanos().to_be_bytes());
            if self.kind == SocketKind::Raw && self.family == Family::V4 {
                packet[2..4].fill(0);
                let sum = checksum(&packet);
                packet[2..4].copy_from_slice(&sum.to_be_bytes());
            }
            let fd = self.fd.get_ref().as_raw_fd();
            let sent = match addr {
                IpAddr::V4(a) => sendto(
                    fd,
                    &packet,
                    &SockaddrIn::from(SocketAddrV4::new(a, 0)),
                    MsgFlags::empty(),
                ),
                IpAddr::V6(a) => {
                    let scope = if is_link_local(&a) { self.ifindex } else { 0 };
                    sendto(
                        fd,
                        &packet,
                        &SockaddrIn6::from(SocketAddrV6::new(a, 0, 0, scope)),
                        MsgFlags::empty(),
                    )
                }
            };
            match sent {
                Ok(_) => return Ok(()),
                Err(Errno::EAGAIN) => {
                    // The send buffer is full: wait until the kernel drained some of it.
                    let mut guard = self
                        .fd
                        .writable()
                        .await
                        .map_err(|e| IcmpError::Closed(e.to_string()))?;
                    guard.clear_ready();
                }
                Err(Errno::EINTR) => {}
                Err(source) => {
                    if matches!(source, Errno::ENODEV | Errno::ENXIO) {
                        self.broken.store(true, Ordering::Relaxed);
                    }
                    return Err(IcmpError::Send { addr, source });
                }
            }
        }
    }

    /// Hands a reply to its probe; anything else is counted and dropped.
    fn on_reply(&self, from: IpAddr, ident: u16, seq: u16, payload: &[u8], received_ns: i64) {
        let counters = &self.counters;
        let ours = self.kind == SocketKind::Datagram || ident == self.ident;
        let Some((cookie, serial, sent_ns)) = stamp(payload) else {
            counters.stray.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !ours || cookie != self.cookie {
            counters.stray.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let waiter = {
            let mut pending = self.lock();
            match pending.waiters.get(&seq) {
                Some(w) if w.serial == serial && w.addr == from => pending.waiters.remove(&seq),
                _ => None,
            }
        };
        let Some(waiter) = waiter else {
            counters.late_or_duplicate.fetch_add(1, Ordering::Relaxed);
            return;
        };
        counters.replies.fetch_add(1, Ordering::Relaxed);
        // The kernel's receive time and the send time are both CLOCK_REALTIME. Should the
        // clock have stepped in between, the monotonic time since the probe was registered
        // (an upper bound) is used instead.
        let elapsed = waiter.registered.elapsed();
        let kernel = received_ns.saturating_sub(sent_ns);
        let rtt = match u64::try_from(kernel) {
            Ok(n) if Duration::from_nanos(n) <= elapsed + Duration::from_millis(1) => {
                Duration::from_nanos(n)
            }
            _ => elapsed,
        };
        let _ = waiter.tx.send(Ok(rtt));
    }

    /// Ends the probe an ICMP error is about, if it is waiting.
    fn on_error(&self, error: QuotedError) {
        let counters = &self.counters;
        if self.kind == SocketKind::Raw && error.ident != self.ident {
            counters.stray.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let waiter = {
            let mut pending = self.lock();
            let serial_matches = |w: &Waiter| {
                stamp(&error.payload)
                    .is_none_or(|(cookie, serial, _)| cookie == self.cookie && serial == w.serial)
            };
            match pending.waiters.get(&error.seq) {
                Some(w) if w.addr == error.to && serial_matches(w) => {
                    pending.waiters.remove(&error.seq)
                }
                _ => None,
            }
        };
        let Some(waiter) = waiter else {
            counters.stray.fetch_add(1, Ordering::Relaxed);
            return;
        };
        counters.errors.fetch_add(1, Ordering::Relaxed);
        let _ = waiter.tx.send(Err(IcmpError::Unreachable {
            addr: error.to,
            from: error.from,
            icmp_type: error.icmp_type,
            code: error.code,
            what: describe_icmp_error(self.family, error.icmp_type, error.code),
        }));
    }
}

/// What an ICMP error says about one of our echo requests.
struct QuotedError {
    /// Destination of the quoted request.
    to: IpAddr,
    /// Who sent the error.
    from: IpAddr,
    icmp_type: u8,
    code: u8,
    ident: u16,
    seq: u16,
    /// The quoted request's payload, as far as it was quoted.
    payload: Vec<u8>,
}

fn stamp(payload: &[u8]) -> Option<(u64, u64, i64)> {
    if payload.len() < STAMP_LEN {
        return None;
    }
    let u = |r: std::ops::Range<usize>| u64::from_be_bytes(payload[r].try_into().expect("8 bytes"));
    Some((u(0..8), u(8..16), u(16..24) as i64))
}

/// How long the receive loop lets replies queue up before reading them. The round trip comes
/// from the kernel's receive timestamp, so reading a little later does not change it; it only
/// turns one wake-up and one empty read per reply into one per batch.
const COALESCE: Duration = Duration::from_millis(4);

async fn receive_loop(ep: Arc<Endpoint>) {
    let mut buf = vec![0u8; 2048];
    let mut cmsg = nix::cmsg_space!(libc::timespec, libc::sock_extended_err, libc::sockaddr_in6);
    loop {
        let mut guard = match ep.fd.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(g) => g,
            Err(e) => {
                warn!(component = "metrics", family = ep.family.name(), error = %e, "ICMP receive loop stopped");
                return;
            }
        };
        // Datagram sockets flag a queued ICMP error as an error condition.
        let mut errors = guard.ready().is_error();
        loop {
            match receive_one(&ep, &mut buf, &mut cmsg) {
                Ok(()) => {}
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                // A pending socket error (IP_RECVERR) is reported once by a plain receive;
                // the details wait in the error queue.
                Err(_) if ep.kind == SocketKind::Datagram => errors = true,
                Err(e) => {
                    warn!(component = "metrics", family = ep.family.name(), error = %e, "ICMP receive failed");
                    break;
                }
            }
        }
        if errors && ep.kind == SocketKind::Datagram {
            while receive_error(&ep, &mut buf, &mut cmsg) {}
        }
        // Only clears if nothing arrived since `ready` returned, so no wake-up is lost.
        guard.clear_ready();
        tokio::time::sleep(COALESCE).await;
    }
}

fn realtime_nanos() -> i64 {
    clock_gettime(ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_sec() * 1_000_000_000 + t.tv_nsec())
        .unwrap_or(0)
}

/// Reads one packet from the normal queue and dispatches it.
fn receive_one(ep: &Endpoint, buf: &mut [u8], cmsg: &mut [u8]) -> Result<(), Errno> {
    let fd = ep.fd.get_ref().as_fd().as_raw_fd();
    let (len, from, received_ns) = {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::empty())?;
        let mut received_ns = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmTimestampns(ts) = c {
                    received_ns = Some(ts.tv_sec() * 1_000_000_000 + ts.tv_nsec());
                }
            }
        }
        let from = msg.address.as_ref().and_then(storage_ip);
        (msg.bytes, from, received_ns.unwrap_or_else(realtime_nanos))
    };
    let Some(from) = from else {
        return Ok(());
    };
    let data = &buf[..len];
    match (ep.kind, ep.family) {
        (SocketKind::Datagram, _) => dispatch_icmp(ep, from, data, received_ns),
        (SocketKind::Raw, Family::V4) => {
            // Raw IPv4 sockets see the IP header too.
            let header = data.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
            if header >= 20 && data.len() > header {
                dispatch_icmp(ep, from, &data[header..], received_ns);
            }
        }
        (SocketKind::Raw, Family::V6) => dispatch_icmp(ep, from, data, received_ns),
    }
    Ok(())
}

/// Parses an ICMP message that starts at `icmp`.
fn dispatch_icmp(ep: &Endpoint, from: IpAddr, icmp: &[u8], received_ns: i64) {
    if icmp.len() < 8 {
        ep.counters.stray.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let (ty, code) = (icmp[0], icmp[1]);
    let ident = u16::from_be_bytes([icmp[4], icmp[5]]);
    let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
    let reply = match ep.family {
        Family::V4 => ICMP_ECHO_REPLY,
        Family::V6 => ICMP6_ECHO_REPLY,
    };
    if ty == reply {
        ep.on_reply(from, ident, seq, &icmp[8..], received_ns);
        return;
    }
    // An error quoting the packet that caused it (raw sockets only: datagram sockets get
    // errors through the error queue).
    match quoted_request(ep.family, &icmp[8..]) {
        Some((to, ident, seq, payload)) => ep.on_error(QuotedError {
            to,
            from,
            icmp_type: ty,
            code,
            ident,
            seq,
            payload: payload.to_vec(),
        }),
        None => {
            ep.counters.stray.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Finds our echo request inside the quoted packet of an ICMP error: destination,
/// identifier, sequence number and whatever payload was quoted.
fn quoted_request(family: Family, quoted: &[u8]) -> Option<(IpAddr, u16, u16, &[u8])> {
    let (to, inner) = match family {
        Family::V4 => {
            let header = usize::from(*quoted.first()? & 0x0f) * 4;
            if header < 20 || quoted.len() < header + 8 || quoted[9] != libc::IPPROTO_ICMP as u8 {
                return None;
            }
            let to: [u8; 4] = quoted[16..20].try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(to)), &quoted[header..])
        }
        Family::V6 => {
            // Extension headers never precede our ICMPv6 requests.
            if quoted.len() < 48 || quoted[6] != libc::IPPROTO_ICMPV6 as u8 {
                return None;
            }
            let to: [u8; 16] = quoted[24..40].try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(to)), &quoted[40..])
        }
    };
    if inner[0] != family.echo_request() {
        return None;
    }
    let ident = u16::from_be_bytes([inner[4], inner[5]]);
    let seq = u16::from_be_bytes([inner[6], inner[7]]);
    Some((to, ident, seq, &inner[8..]))
}

/// Reads one message from a datagram socket's error queue; `false` when it is empty.
fn receive_error(ep: &Endpoint, buf: &mut [u8], cmsg: &mut [u8]) -> bool {
    let fd = ep.fd.get_ref().as_raw_fd();
    let (len, to, details) = {
        let mut iov = [IoSliceMut::new(&mut *buf)];
        let Ok(msg) = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::MSG_ERRQUEUE)
        else {
            return false;
        };
        let len = msg.bytes;
        let to = msg.address.as_ref().and_then(storage_ip);
        let mut details = None;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                match c {
                    ControlMessageOwned::Ipv4RecvErr(e, offender) => {
                        let from = offender
                            .map(|o| IpAddr::V4(Ipv4Addr::from(u32::from_be(o.sin_addr.s_addr))));
                        details = Some((e, from));
                    }
                    ControlMessageOwned::Ipv6RecvErr(e, offender) => {
                        let from =
                            offender.map(|o| IpAddr::V6(Ipv6Addr::from(o.sin6_addr.s6_addr)));
                        details = Some((e, from));
                    }
                    _ => {}
                }
            }
        }
        (len, to, details)
    };
    let (Some(to), Some((e, from))) = (to, details) else {
        ep.counters.stray.fetch_add(1, Ordering::Relaxed);
        return true;
    };
    let origin_icmp =
        e.ee_origin == libc::SO_EE_ORIGIN_ICMP || e.ee_origin == libc::SO_EE_ORIGIN_ICMP6;
    // The queued data is our own echo request header and payload, as quoted.
    let data = &buf[..len.min(buf.len())];
    if !origin_icmp || data.len() < 8 {
        debug!(
            component = "metrics",
            errno = e.ee_errno,
            origin = e.ee_origin,
            "local error on the ICMP socket"
        );
        return true;
    }
    ep.on_error(QuotedError {
        to,
        from: from.unwrap_or(to),
        icmp_type: e.ee_type,
        code: e.ee_code,
        ident: u16::from_be_bytes([data[4], data[5]]),
        seq: u16::from_be_bytes([data[6], data[7]]),
        payload: data[8..].to_vec(),
    });
    true
}

fn storage_ip(s: &SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// The Internet checksum (RFC 1071), which raw IPv4 sockets leave to the sender.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn random_u64() -> u64 {
    // RandomState is seeded from the OS's random source; good enough for a cookie and an
    // identifier, and no extra crate.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn describe_icmp_error(family: Family, ty: u8, code: u8) -> &'static str {
    match (family, ty, code) {
        (Family::V4, ICMP_DEST_UNREACH, 0) => "network unreachable",
        (Family::V4, ICMP_DEST_UNREACH, 1) => "host unreachable",
        (Family::V4, ICMP_DEST_UNREACH, 2) => "protocol unreachable",
        (Family::V4, ICMP_DEST_UNREACH, 3) => "port unreachable",
        (Family::V4, ICMP_DEST_UNREACH, 4) => "fragmentation needed",
        (Family::V4, ICMP_DEST_UNREACH, 9 | 10 | 13) => "administratively prohibited",
        (Family::V4, ICMP_DEST_UNREACH, _) => "destination unreachable",
        (Family::V4, ICMP_TIME_EXCEEDED, _) => "time to live exceeded",
        (Family::V4, ICMP_PARAMETER_PROBLEM, _) => "parameter problem",
        (Family::V6, ICMP6_DEST_UNREACH, 0) => "no route to destination",
        (Family::V6, ICMP6_DEST_UNREACH, 1) => "administratively prohibited",
        (Family::V6, ICMP6_DEST_UNREACH, 3) => "address unreachable",
        (Family::V6, ICMP6_DEST_UNREACH, 4) => "port unreachable",
        (Family::V6, ICMP6_DEST_UNREACH, 5 | 6) => "rejected by policy",
        (Family::V6, ICMP6_DEST_UNREACH, _) => "destination unreachable",
        (Family::V6, ICMP6_PACKET_TOO_BIG, _) => "packet too big",
        (Family::V6, ICMP6_TIME_EXCEEDED, _) => "hop limit exceeded",
        (Family::V6, ICMP6_PARAMETER_PROBLEM, _) => "parameter problem",
        _ => "ICMP error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc_1071_example() {
        // RFC 1071's example words sum to 0xddf2; the checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
        // A packet with its checksum filled in sums to zero.
        let mut p = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, 0xaa, 0xbb, 0xcc];
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&p), 0);
    }

    #[test]
    fn quoted_ipv4_request_is_found() {
        let mut q = vec![0x45, 0, 0, 84, 0, 0, 0x40, 0, 64, 1, 0, 0];
        q.extend([10, 0, 0, 1, 10, 77, 0, 5]);
        q.extend([ICMP_ECHO_REQUEST, 0, 0, 0, 0xbe, 0xef, 0x01, 0x02, 9, 9]);
        let (to, ident, seq, payload) = quoted_request(Family::V4, &q).unwrap();
        assert_eq!(to, "10.77.0.5".parse::<IpAddr>().unwrap());
        assert_eq!((ident, seq, payload), (0xbeef, 0x0102, &[9u8, 9][..]));
        // A quoted UDP datagram is not ours.
        q[9] = 17;
        assert!(quoted_request(Family::V4, &q).is_none());
    }

    #[test]
    fn quoted_ipv6_request_is_found() {
        let mut q = vec![0x60, 0, 0, 0, 0, 64, 58, 64];
        q.extend("fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        q.extend("fd78::5".parse::<Ipv6Addr>().unwrap().octets());
        q.extend([ICMP6_ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0xff, 0xfe]);
        let (to, ident, seq, payload) = quoted_request(Family::V6, &q).unwrap();
        assert_eq!(to, "fd78::5".parse::<IpAddr>().unwrap());
        assert_eq!((ident, seq), (0x1234, 0xfffe));
        assert!(payload.is_empty());
        q[40] = ICMP6_ECHO_REPLY;
        assert!(quoted_request(Family::V6, &q).is_none());
    }

    #[test]
    fn error_texts_say_what_happened() {
        assert_eq!(describe_icmp_error(Family::V4, 3, 1), "host unreachable");
        assert_eq!(
            describe_icmp_error(Family::V4, 11, 0),
            "time to live exceeded"
        );
        assert_eq!(
            describe_icmp_error(Family::V6, 1, 0),
            "no route to destination"
        );
        assert_eq!(describe_icmp_error(Family::V6, 3, 0), "hop limit exceeded");
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

    #[test]
    fn stamp_needs_the_whole_stamp() {
        let mut p = vec![0u8; STAMP_LEN];
        p[7] = 1;
        p[15] = 2;
        p[23] = 3;
        assert_eq!(stamp(&p), Some((1, 2, 3)));
        assert_eq!(stamp(&p[..STAMP_LEN - 1]), None);
    }
}
