//! One ICMP or ICMPv6 socket of the pinger: opening and configuring it, sending echo
//! requests, and the receive loop that reads replies, errors and their kernel timestamps.

use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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
use tracing::{debug, warn};

use super::{
    random_u64, IcmpError, IcmpOptions, Outcome, ReceiveCounts, ReceiveTask, SocketChoice,
    SocketKind,
};
use crate::accounting::icmp::{
    self, describe_error, echo_request, parse_message, round_trip, set_send_time, Family, Matched,
    Message, ProbeTable, QuotedRequest, PACKET_LEN,
};

/// `linux/icmp.h` and `linux/icmpv6.h`: the per-type receive filters of raw sockets.
const ICMP_FILTER: libc::c_int = 1;
const ICMPV6_FILTER: libc::c_int = 1;

/// One open socket and the probes waiting on it.
pub(super) struct ProbeSocket {
    fd: AsyncFd<OwnedFd>,
    family: Family,
    pub(super) kind: SocketKind,
    /// The identifier raw sockets put into requests and expect in replies.
    ident: u16,
    cookie: u64,
    ifindex: u32,
    probes: Mutex<ProbeTable<oneshot::Sender<Outcome>>>,
    counts: Arc<ReceiveCounts>,
    /// Set when the bound interface went away: the socket stays bound to the old interface
    /// index, so it has to be replaced (see [`super::IcmpPinger::reopen_broken`]).
    broken: AtomicBool,
}

/// Opens a socket of `family` as `options` say and starts its receive task.
pub(super) fn open_socket(
    family: Family,
    options: &IcmpOptions,
    cookie: u64,
    counts: &Arc<ReceiveCounts>,
) -> Result<(Arc<ProbeSocket>, ReceiveTask), IcmpError> {
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
    let ps = Arc::new(ProbeSocket {
        fd,
        family,
        kind,
        ident: (random_u64() & 0xffff) as u16,
        cookie,
        ifindex,
        probes: Mutex::new(ProbeTable::new(cookie, (random_u64() & 0xffff) as u16)),
        counts: counts.clone(),
        broken: AtomicBool::new(false),
    });
    let task = tokio::spawn(receive_loop(ps.clone()));
    Ok((ps, ReceiveTask(task)))
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
        (SocketKind::Raw, Family::V4) => {
            raw_setsockopt(fd, libc::SOL_RAW, ICMP_FILTER, &family.raw_filter()[0])?;
        }
        (SocketKind::Raw, Family::V6) => {
            raw_setsockopt(
                fd,
                libc::IPPROTO_ICMPV6,
                ICMPV6_FILTER,
                &family.raw_filter(),
            )?;
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

impl ProbeSocket {
    pub(super) fn lock(&self) -> MutexGuard<'_, ProbeTable<oneshot::Sender<Outcome>>> {
        self.probes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    /// Reserves a sequence number for a probe to `addr`.
    pub(super) fn register(
        &self,
        addr: IpAddr,
        tx: oneshot::Sender<Outcome>,
    ) -> Result<(u16, u64), IcmpError> {
        self.lock()
            .register(addr, Instant::now(), tx)
            .map_err(IcmpError::Busy)
    }

    pub(super) async fn send(&self, addr: IpAddr, seq: u16, serial: u64) -> Result<(), IcmpError> {
        // Datagram sockets overwrite the identifier with their own and fill in the checksum.
        let mut packet = echo_request(self.family, self.ident, seq, self.cookie, serial);
        let with_checksum = self.kind == SocketKind::Raw && self.family == Family::V4;
        loop {
            // The send time goes into the payload right before the system call, as late as
            // the packet allows; the reply brings it back.
            set_send_time(&mut packet, realtime_nanos(), with_checksum);
            let fd = self.fd.get_ref().as_raw_fd();
            let sent = send_to(fd, &packet, addr, self.ifindex);
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
        let ours = self.kind == SocketKind::Datagram || ident == self.ident;
        let matched = self.lock().take_reply(ours, from, seq, payload);
        let probe = match matched {
            Matched::Probe(p) => p,
            Matched::LateOrDuplicate => {
                self.counts
                    .late_or_duplicate
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            Matched::Stray => {
                self.counts.stray.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        self.counts.replies.fetch_add(1, Ordering::Relaxed);
        let sent_ns = icmp::Stamp::parse(payload).map_or(received_ns, |s| s.sent_ns);
        let rtt = round_trip(received_ns, sent_ns, probe.registered.elapsed());
        let _ = probe.reply_to.send(Ok(rtt));
    }

    /// Ends the probe an ICMP error from `from` is about, if it is waiting.
    fn on_error(&self, from: IpAddr, icmp_type: u8, code: u8, request: &QuotedRequest<'_>) {
        let ours = self.kind == SocketKind::Datagram || request.ident == self.ident;
        let Matched::Probe(probe) = self.lock().take_error(ours, request) else {
            self.counts.stray.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.counts.errors.fetch_add(1, Ordering::Relaxed);
        let _ = probe.reply_to.send(Err(IcmpError::Unreachable {
            addr: request.to,
            from,
            icmp_type,
            code,
            what: describe_error(self.family, icmp_type, code),
        }));
    }
}

fn send_to(fd: i32, packet: &[u8; PACKET_LEN], addr: IpAddr, ifindex: u32) -> Result<usize, Errno> {
    match addr {
        IpAddr::V4(a) => sendto(
            fd,
            packet,
            &SockaddrIn::from(SocketAddrV4::new(a, 0)),
            MsgFlags::empty(),
        ),
        IpAddr::V6(a) => {
            let scope = if is_link_local(&a) { ifindex } else { 0 };
            sendto(
                fd,
                packet,
                &SockaddrIn6::from(SocketAddrV6::new(a, 0, 0, scope)),
                MsgFlags::empty(),
            )
        }
    }
}

/// How long the receive loop lets replies queue up before reading them. The round trip comes
/// from the kernel's receive timestamp, so reading a little later does not change it; it only
/// turns one wake-up and one empty read per reply into one per batch.
const COALESCE: Duration = Duration::from_millis(4);

async fn receive_loop(ps: Arc<ProbeSocket>) {
    let mut buf = vec![0u8; 2048];
    let mut cmsg = nix::cmsg_space!(libc::timespec, libc::sock_extended_err, libc::sockaddr_in6);
    loop {
        let mut guard = match ps.fd.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(g) => g,
            Err(e) => {
                warn!(component = "metrics", family = ps.family.name(), error = %e, "ICMP receive loop stopped");
                return;
            }
        };
        // Datagram sockets flag a queued ICMP error as an error condition.
        let mut errors = guard.ready().is_error();
        loop {
            match receive_one(&ps, &mut buf, &mut cmsg) {
                Ok(()) => {}
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                // A pending socket error (IP_RECVERR) is reported once by a plain receive;
                // the details wait in the error queue.
                Err(_) if ps.kind == SocketKind::Datagram => errors = true,
                Err(e) => {
                    warn!(component = "metrics", family = ps.family.name(), error = %e, "ICMP receive failed");
                    break;
                }
            }
        }
        if errors && ps.kind == SocketKind::Datagram {
            while receive_error(&ps, &mut buf, &mut cmsg) {}
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
fn receive_one(ps: &ProbeSocket, buf: &mut [u8], cmsg: &mut [u8]) -> Result<(), Errno> {
    let fd = ps.fd.get_ref().as_fd().as_raw_fd();
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
    match (ps.kind, ps.family) {
        (SocketKind::Datagram, _) => dispatch_icmp(ps, from, data, received_ns),
        // Raw IPv4 sockets see the IP header too.
        (SocketKind::Raw, Family::V4) => {
            if let Some(icmp) = icmp::strip_ipv4_header(data) {
                dispatch_icmp(ps, from, icmp, received_ns);
            }
        }
        (SocketKind::Raw, Family::V6) => dispatch_icmp(ps, from, data, received_ns),
    }
    Ok(())
}

/// Hands an ICMP message (the ICMP header first) to the probe it answers.
fn dispatch_icmp(ps: &ProbeSocket, from: IpAddr, icmp: &[u8], received_ns: i64) {
    match parse_message(ps.family, icmp) {
        Message::Reply {
            ident,
            seq,
            payload,
        } => ps.on_reply(from, ident, seq, payload, received_ns),
        // An error quoting the packet that caused it (raw sockets only: datagram sockets get
        // errors through the error queue).
        Message::Error {
            icmp_type,
            code,
            request,
        } => ps.on_error(from, icmp_type, code, &request),
        Message::Other => {
            ps.counts.stray.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads one message from a datagram socket's error queue; `false` when it is empty.
fn receive_error(ps: &ProbeSocket, buf: &mut [u8], cmsg: &mut [u8]) -> bool {
    let fd = ps.fd.get_ref().as_raw_fd();
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
        ps.counts.stray.fetch_add(1, Ordering::Relaxed);
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
    let request = QuotedRequest {
        to,
        ident: u16::from_be_bytes([data[4], data[5]]),
        seq: u16::from_be_bytes([data[6], data[7]]),
        payload: &data[8..],
    };
    ps.on_error(from.unwrap_or(to), e.ee_type, e.ee_code, &request);
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
