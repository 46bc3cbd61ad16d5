//! Kernel programs of plexd-metrics.
//!
//! Two TC classifiers, one per direction, on the underlay interfaces. Each counts every
//! packet, and for UDP to or from a WireGuard listen port it parses the WireGuard message:
//! incoming transport messages go to their session (loss window and receive counters, under
//! one lock), everything else to per-endpoint counters. They only observe: each returns
//! `TC_ACT_UNSPEC`, so the packet goes on to whatever else is attached exactly as if they were
//! not there (`TC_ACT_PIPE` would end a TCX chain early).
//!
//! Names and layouts come from `plexd-metrics-common`, the one place that defines the contract
//! with the agent; the assertions below make a rename there fail this build instead of failing
//! at load time on a node.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_UNSPEC},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    helpers::{bpf_ktime_get_coarse_ns, bpf_spin_lock, bpf_spin_unlock},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use plexd_metrics_common::{
    checkpoint_ns, session_slot, session_slot_shift, Direction, EndpointKey, EndpointStats,
    FreshSession, PacketCounters, PortSet, ProbationSession, ProbeStat, SessionState,
    DEFAULT_MAX_ENDPOINTS, DEFAULT_MAX_SESSIONS, DEFAULT_REORDER_TIMEOUT_NS, DEFAULT_SESSION_SLOTS,
    DIRECTIONS, GLOBAL_CHECKPOINT_NS, GLOBAL_REORDER_TIMEOUT_NS, GLOBAL_SESSION_SLOT_SHIFT,
    MAP_ENDPOINTS, MAP_FRESH_SESSIONS, MAP_LISTEN_PORTS, MAP_PACKET_COUNTERS, MAP_PROBATION,
    MAP_PROBE_STATS, MAP_SESSIONS, MAP_SESSION_SLOTS, PROBE_STAT_COUNT, PROG_COUNT_ONLY,
    PROG_EGRESS, PROG_INGRESS, SESSION_EXPIRY_NS, SESSION_STARTED,
};
use plexd_metrics_ebpf::{
    parse::{classify, parse_frame, read_message, Frame, Message, Packet, Segments, HEADER_LEN},
    record, same_name, window,
};

/// Packets and bytes per [`Direction`], every packet. Per-CPU, so that concurrent packets
/// on different CPUs never contend and a plain add is enough; the agent sums the CPUs.
#[btf_map]
static PACKET_COUNTERS: PerCpuArray<PacketCounters, { DIRECTIONS as usize }> = PerCpuArray::new();

/// The WireGuard listen ports, written by the agent.
#[btf_map]
static LISTEN_PORTS: Array<PortSet, 1> = Array::new();

/// Per remote endpoint counters of what is not counted in a session. Not preallocated: the
/// agent sets the size at load time, and a preallocated per-CPU hash costs size × CPUs × 112
/// bytes up front.
#[btf_map]
static ENDPOINTS: PerCpuHashMap<
    EndpointKey,
    EndpointStats,
    { DEFAULT_MAX_ENDPOINTS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// Loss windows, each in the slot its receiver index picks ([`session_slot`]) and tagged
/// with it. The common case costs an inlined array lookup where a hash lookup costs a hash
/// and a key comparison in a kernel function, about a quarter of the program's time. A new
/// session takes its slot when the slot is empty or its session has ended
/// ([`SESSION_EXPIRY_NS`]); the kernel reuses slots itself, so the agent only reads them.
#[btf_map]
static SESSION_SLOTS: Array<SessionState, { DEFAULT_SESSION_SLOTS as usize }> = Array::new();

/// Loss windows of the sessions whose slot a live session holds, by receiver index. A plain
/// hash, not LRU: the kernel refuses spin locks in LRU maps. The agent removes sessions
/// WireGuard no longer accepts; when the map is full a new session is counted as an
/// overflow.
#[btf_map]
static SESSIONS: HashMap<
    u32,
    SessionState,
    { DEFAULT_MAX_SESSIONS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Receiver indexes this host announced in handshakes: their first counter is 0. Losing an
/// entry to the LRU only loses that hint.
#[btf_map]
static FRESH_SESSIONS: LruHashMap<u32, FreshSession, { DEFAULT_MAX_ENDPOINTS as usize }> =
    LruHashMap::new();

/// The first messages of receiver indexes no handshake of this host announced, until they
/// look like a session. LRU: made-up indexes only push out each other. The agent sizes it
/// like [`SESSION_SLOTS`], the only place such a session may go.
#[btf_map]
static PROBATION: LruHashMap<u32, ProbationSession, { DEFAULT_SESSION_SLOTS as usize }> =
    LruHashMap::new();

/// The remote endpoint of the GSO/GRO packet being accounted, per direction and CPU, for
/// [`plexd_segment`]. The kernel programs' scratch space: the agent never reads it.
#[btf_map]
static SEGMENT_REMOTE: PerCpuArray<EndpointKey, { DIRECTIONS as usize }> = PerCpuArray::new();

/// Probe-wide counters by [`ProbeStat`].
#[btf_map]
static PROBE_STATS: PerCpuArray<u64, { PROBE_STAT_COUNT as usize }> = PerCpuArray::new();

/// The reorder timeout; the agent sets it at load time (`metrics.ebpf.reorder_timeout`).
#[unsafe(no_mangle)]
static REORDER_TIMEOUT_NS: u64 = DEFAULT_REORDER_TIMEOUT_NS;

/// The width of one checkpoint, derived from the timeout by the agent.
#[unsafe(no_mangle)]
static CHECKPOINT_NS: u64 = checkpoint_ns(DEFAULT_REORDER_TIMEOUT_NS);

/// The shift of [`session_slot`] for the size the agent gave [`SESSION_SLOTS`].
#[unsafe(no_mangle)]
static SESSION_SLOT_SHIFT: u32 = session_slot_shift(DEFAULT_SESSION_SLOTS);

/// A zeroed session value to insert from: 512 bytes do not fit the 512-byte BPF stack next
/// to everything else. An array of words rather than a `SessionState`, because a global
/// holding a spin lock would make the kernel treat `.rodata` as a locked map.
static ZERO_SESSION: [u64; 64] = [0; 64];

/// A zeroed endpoint value to insert from, copied by the kernel instead of built on the
/// stack (which would take a memset call).
static ZERO_ENDPOINT: [u64; 14] = [0; 14];

/// WireGuard's REJECT_AFTER_TIME: a session older than this receives nothing more.
const REJECT_AFTER_NS: u64 = 180_000_000_000;
/// GSO/GRO packets with more segments than this are counted up to this many. UDP GRO
/// merges at most 64 datagrams; UDP GSO sends at most 128 (`UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: u32 = 64;
const EEXIST: i32 = 17;
const ENOMEM: i32 = 12;

// The macros take the symbol's own name as the map and program name, so the contract's
// constants are checked against the symbols here.
const _: () = assert!(same_name(MAP_PACKET_COUNTERS, "PACKET_COUNTERS"));
const _: () = assert!(same_name(MAP_LISTEN_PORTS, "LISTEN_PORTS"));
const _: () = assert!(same_name(MAP_ENDPOINTS, "ENDPOINTS"));
const _: () = assert!(same_name(MAP_SESSIONS, "SESSIONS"));
const _: () = assert!(same_name(MAP_SESSION_SLOTS, "SESSION_SLOTS"));
const _: () = assert!(same_name(MAP_FRESH_SESSIONS, "FRESH_SESSIONS"));
const _: () = assert!(same_name(MAP_PROBATION, "PROBATION"));
const _: () = assert!(same_name(MAP_PROBE_STATS, "PROBE_STATS"));
const _: () = assert!(same_name(GLOBAL_REORDER_TIMEOUT_NS, "REORDER_TIMEOUT_NS"));
const _: () = assert!(same_name(GLOBAL_CHECKPOINT_NS, "CHECKPOINT_NS"));
const _: () = assert!(same_name(GLOBAL_SESSION_SLOT_SHIFT, "SESSION_SLOT_SHIFT"));
const _: () = assert!(same_name(PROG_INGRESS, "plexd_tc_ingress"));
const _: () = assert!(same_name(PROG_EGRESS, "plexd_tc_egress"));
const _: () = assert!(same_name(PROG_COUNT_ONLY, "plexd_tc_count"));
const _: () = assert!(core::mem::size_of::<SessionState>() == 64 * 8);
const _: () = assert!(core::mem::size_of::<EndpointStats>() == 14 * 8);

/// Accounts a packet arriving on the interface.
#[classifier]
pub fn plexd_tc_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, Direction::Ingress);
    TC_ACT_UNSPEC
}

/// Accounts a packet leaving through the interface.
#[classifier]
pub fn plexd_tc_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Direction::Egress);
    TC_ACT_UNSPEC
}

/// Counts packets and nothing else: the baseline of `cargo xtask bench`.
#[classifier]
pub fn plexd_tc_count(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Ingress);
    TC_ACT_UNSPEC
}

/// Packet bytes: read in place when they lie in the linear part of the buffer, copied with
/// `bpf_skb_load_bytes` when they lie in paged fragments (GRO packets). In place is several
/// times cheaper than the helper call.
struct Skb<'a> {
    ctx: &'a TcContext,
    data: usize,
    end: usize,
}

impl<'a> Skb<'a> {
    #[inline(always)]
    fn new(ctx: &'a TcContext) -> Self {
        Self {
            ctx,
            data: ctx.data(),
            end: ctx.data_end(),
        }
    }
}

impl Packet for Skb<'_> {
    #[inline(always)]
    fn len(&self) -> u32 {
        self.ctx.len()
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        // Bounded for the verifier, which tracks packet pointers only with known ranges;
        // every header offset the parser computes is far below this.
        let offset = (offset & 0x3fff) as usize;
        if self.data + offset + N <= self.end {
            // SAFETY: the bytes lie between data and data_end, which the kernel keeps
            // readable for the duration of the program; unaligned, as headers are.
            Some(unsafe { core::ptr::read_unaligned((self.data + offset) as *const [u8; N]) })
        } else {
            self.ctx.load::<[u8; N]>(offset).ok()
        }
    }
}

/// Packet bytes through `bpf_skb_load_bytes` only: for the segments of GSO packets, which
/// lie in paged fragments anyway, and whose loop the verifier walks 64 times, so one way to
/// read per segment keeps it within budget.
struct SkbCopy<'a>(&'a TcContext);

impl Packet for SkbCopy<'_> {
    #[inline(always)]
    fn len(&self) -> u32 {
        self.0.len()
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset as usize).ok()
    }
}

#[inline(always)]
fn observe(ctx: &TcContext, direction: Direction) {
    count(ctx, direction);
    let Some(ports) = LISTEN_PORTS.get(0) else {
        return;
    };
    let pkt = Skb::new(ctx);
    let datagram = match parse_frame(&pkt, direction, |p| ports.contains(p)) {
        Frame::Other => return,
        Frame::WireGuardPort(d) => d,
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: the context of a TC program is its __sk_buff.
    let (gso_segs, gso_size) = unsafe { ((*ctx.skb.skb).gso_segs, (*ctx.skb.skb).gso_size) };
    let segments = if datagram.malformed {
        None
    } else {
        Segments::of(datagram.payload_len, gso_segs, gso_size)
    };
    let Some(segments) = segments else {
        malformed(&datagram.remote);
        return;
    };
    if segments.count == 1 {
        let message = read_message(&pkt, datagram.payload_offset, datagram.payload_len);
        account(
            direction,
            &datagram.remote,
            message,
            u64::from(ctx.len()),
            now,
        );
        return;
    }
    // One packet, many datagrams: each segment on the wire had its own headers. Each segment
    // goes through a global function, which the kernel verifies once: inlined, the verifier
    // walks the whole accounting once per iteration, and older kernels (6.1) give up.
    let Some(slot) = SEGMENT_REMOTE.get_ptr_mut(direction as u32) else {
        return;
    };
    // SAFETY: this CPU's slot, see `count`; read back by `plexd_segment` below.
    unsafe { *slot = datagram.remote };
    let headers = datagram.payload_offset;
    let mut i = 0;
    while i < MAX_SEGMENTS && i < segments.count {
        let len = if i + 1 == segments.count {
            segments.last
        } else {
            segments.size
        };
        // A segment too short for a header reads the next one's bytes or fails; either way
        // its length makes it malformed.
        let header = SkbCopy(ctx)
            .read::<HEADER_BYTES>(datagram.payload_offset + i * segments.size)
            .unwrap_or([0; HEADER_BYTES]);
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&header[..8]);
        hi.copy_from_slice(&header[8..]);
        plexd_segment(
            u64::from_ne_bytes(lo),
            u64::from_ne_bytes(hi),
            (u64::from(headers + len) << 32) | u64::from(len),
            direction as u64,
            now,
        );
        i += 1;
    }
}

/// Bytes of a message header, as the parser reads them.
const HEADER_BYTES: usize = HEADER_LEN as usize;

/// Accounts one segment of a GSO/GRO packet, as a BPF global function (see the loop in
/// `observe`). Global functions take scalars only, so the message header comes as two words
/// in memory order, its length and the segment's bytes on the wire packed into
/// `len_and_bytes` (length in the low half), and the remote endpoint through
/// [`SEGMENT_REMOTE`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn plexd_segment(
    header_lo: u64,
    header_hi: u64,
    len_and_bytes: u64,
    direction: u64,
    now: u64,
) -> u32 {
    let direction = if direction == Direction::Egress as u64 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    let Some(remote) = SEGMENT_REMOTE.get(direction as u32) else {
        return 0;
    };
    let remote = *remote;
    let mut header = [0u8; HEADER_BYTES];
    header[..8].copy_from_slice(&header_lo.to_ne_bytes());
    header[8..].copy_from_slice(&header_hi.to_ne_bytes());
    let message = classify(&header, len_and_bytes as u32);
    account(direction, &remote, message, len_and_bytes >> 32, now);
    0
}

#[inline(always)]
fn count(ctx: &TcContext, direction: Direction) {
    // The lookup cannot fail for an index below DIRECTIONS, but the verifier insists on the
    // check; a miss simply goes uncounted rather than disturbing the packet.
    if let Some(slot) = PACKET_COUNTERS.get_ptr_mut(direction as u32) {
        // SAFETY: the slot belongs to this CPU and TC programs run with migration disabled;
        // ingress (softirq) and egress (BH disabled) cannot interleave on one CPU, and they
        // use different indices anyway.
        record(unsafe { &mut *slot }, ctx.len());
    }
}

#[inline(always)]
fn stat(which: ProbeStat) {
    if let Some(slot) = PROBE_STATS.get_ptr_mut(which as u32) {
        // SAFETY: this CPU's slot, see `count`.
        unsafe { *slot += 1 };
    }
}

/// The endpoint's counters on this CPU, created for a `valid` message. `None` for a
/// malformed message from an unknown endpoint (counted probe-wide) or when the map is full.
#[inline(always)]
fn endpoint(remote: &EndpointKey, valid: bool, now: u64) -> Option<*mut EndpointStats> {
    if let Some(stats) = ENDPOINTS.get_ptr_mut(remote) {
        // SAFETY: this CPU's copy of the value; see `count`.
        unsafe { (*stats).last_seen_ns = now };
        return Some(stats);
    }
    if !valid {
        stat(ProbeStat::MalformedUnknown);
        return None;
    }
    // SAFETY: ZERO_ENDPOINT has the size of EndpointStats and all-zero bytes.
    let zero = unsafe { &*(&raw const ZERO_ENDPOINT).cast::<EndpointStats>() };
    match ENDPOINTS.insert(remote, zero, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        // Another CPU created it in between.
        Err(e) if e == -EEXIST => {}
        Err(e) => {
            stat(creation_failure(e));
            return None;
        }
    }
    let stats = ENDPOINTS.get_ptr_mut(remote)?;
    // SAFETY: this CPU's copy of the value; see `count`.
    unsafe { (*stats).last_seen_ns = now };
    Some(stats)
}

/// What a failed endpoint insert means: E2BIG when the map is full, ENOMEM when the kernel
/// had no memory at hand for a new entry.
#[inline(always)]
fn creation_failure(errno: i32) -> ProbeStat {
    if errno == -ENOMEM {
        ProbeStat::AllocationFailure
    } else {
        ProbeStat::EndpointOverflow
    }
}

#[inline(always)]
fn malformed(remote: &EndpointKey) {
    match ENDPOINTS.get_ptr_mut(remote) {
        // SAFETY: this CPU's copy of the value; see `count`.
        Some(stats) => unsafe { (*stats).malformed += 1 },
        None => stat(ProbeStat::MalformedUnknown),
    }
}

/// Counts one message of `bytes` bytes on the wire.
#[inline(always)]
fn account(direction: Direction, remote: &EndpointKey, message: Message, bytes: u64, now: u64) {
    if let (
        Direction::Ingress,
        Message::Transport {
            receiver,
            counter,
            keepalive,
        },
    ) = (direction, message)
    {
        let arrival = Received {
            receiver,
            counter,
            keepalive,
            bytes,
            remote,
            now,
        };
        if receive(&arrival) {
            return;
        }
        // No session to count it in (the map is full): the endpoint's own counters.
        if let Some(stats) = endpoint(remote, true, now) {
            // SAFETY: this CPU's copy of the value; see `count`.
            let stats = unsafe { &mut *stats };
            stats.rx_packets += 1;
            stats.rx_bytes += bytes;
            if keepalive {
                stats.rx_keepalives += 1;
            }
        }
        return;
    }
    let Some(stats) = endpoint(remote, message != Message::Malformed, now) else {
        return;
    };
    // SAFETY: this CPU's copy of the value; see `count`.
    let stats = unsafe { &mut *stats };
    match (direction, message) {
        // Taken above.
        (Direction::Ingress, Message::Transport { .. }) => {}
        (Direction::Egress, Message::Transport { keepalive, .. }) => {
            stats.tx_packets += 1;
            stats.tx_bytes += bytes;
            if keepalive {
                stats.tx_keepalives += 1;
            }
        }
        (Direction::Ingress, Message::Initiation { .. }) => stats.initiations_received += 1,
        (Direction::Egress, Message::Initiation { sender }) => {
            stats.initiations_sent += 1;
            announce(sender, now);
        }
        (Direction::Ingress, Message::Response { .. }) => stats.responses_received += 1,
        (Direction::Egress, Message::Response { sender }) => {
            stats.responses_sent += 1;
            announce(sender, now);
        }
        (Direction::Ingress, Message::CookieReply) => stats.cookies_received += 1,
        (Direction::Egress, Message::CookieReply) => stats.cookies_sent += 1,
        (_, Message::Malformed) => stats.malformed += 1,
    }
}

/// Remembers that this host will receive with `index`, in a session that starts now.
#[inline(always)]
fn announce(index: u32, now: u64) {
    let value = FreshSession { announced_ns: now };
    // An LRU map always finds room; nothing to count if the update fails otherwise.
    let _ = FRESH_SESSIONS.insert(index, value, u64::from(BPF_ANY));
}

/// A received transport message: what [`window::receive`] takes and the endpoint it came
/// from.
struct Received<'a> {
    receiver: u32,
    counter: u64,
    keepalive: bool,
    bytes: u64,
    remote: &'a EndpointKey,
    now: u64,
}

/// What [`admit`] decided for a message of an index without a window.
enum Admit {
    /// This host announced the index: the session starts now, at counter 0.
    Fresh,
    /// Held in probation.
    Held,
    /// Its probation entry (this message included) shows a session: it starts from what
    /// the entry held.
    Promoted(ProbationSession),
}

/// Feeds a received transport message into its session: the one in its slot, else the one
/// in [`SESSIONS`]. A new session this host announced goes into its slot if it can have it,
/// else into [`SESSIONS`]; any other index waits in [`PROBATION`] until its messages look
/// like a session, and then may only take a free slot. Returns false when the message
/// could be counted nowhere.
#[inline(always)]
fn receive(m: &Received) -> bool {
    // SAFETY: a read-only global the loader may have rewritten; volatile so that the
    // compiler does not fold the default in.
    let shift = unsafe { core::ptr::read_volatile(&SESSION_SLOT_SHIFT) };
    let slot = SESSION_SLOTS.get_ptr_mut(session_slot(m.receiver, shift));
    if let Some(slot) = slot {
        // A first look without the lock, decided again under it: which session holds the
        // slot, and whether it has ended.
        // SAFETY: a live map value; fields are read whole, a stale value only sends the
        // message down the slower path below.
        let (held, holder, last_seen) = unsafe {
            (
                (*slot).flags & SESSION_STARTED != 0,
                (*slot).receiver,
                (*slot).last_seen_ns,
            )
        };
        if held && holder == m.receiver {
            // SAFETY: a value of SESSION_SLOTS, whose BTF has the lock.
            if unsafe { in_slot(slot, m, false, false) } != Slot::Other {
                return true;
            }
        } else if (!held || m.now.saturating_sub(last_seen) > SESSION_EXPIRY_NS)
            && SESSIONS.get_ptr_mut(m.receiver).is_none()
        {
            let taken = match admit(m, true) {
                Admit::Held => return true,
                // Its own path, apart from the window's: the verifier walks each path
                // into the window once more.
                // SAFETY: as above.
                Admit::Promoted(entry) => unsafe { promote_in_slot(slot, m, &entry) },
                // SAFETY: as above.
                Admit::Fresh => match unsafe { in_slot(slot, m, true, true) } {
                    Slot::Ours => return true,
                    Slot::Taken => true,
                    Slot::Other => false,
                },
            };
            if taken {
                session_created(m);
                // Another CPU may have put the same session into the hash between the
                // look above and the taking: counted, since its loss is now split. That
                // CPU looks at the slot after its insert (`in_hash`), so at least one of
                // the two sees the other.
                if SESSIONS.get_ptr_mut(m.receiver).is_some() {
                    stat(ProbeStat::SessionsSplit);
                }
                return true;
            }
        }
    }
    in_hash(m, slot)
}

/// What a message of an index without a window starts: a session this host announced, a
/// promoted one (only when `may_promote`: a free slot awaits it), or nothing yet (the
/// message was held in [`PROBATION`]).
#[inline(always)]
fn admit(m: &Received, may_promote: bool) -> Admit {
    if is_fresh(m.receiver, m.now) {
        return Admit::Fresh;
    }
    stat(ProbeStat::ProbationMessages);
    let entry = match PROBATION.get_ptr_mut(m.receiver) {
        Some(entry) => entry,
        None => {
            let zero = ProbationSession::default();
            // An LRU map finds room by evicting; a failure only loses this message.
            if PROBATION.insert(m.receiver, zero, 0).is_err() {
                return Admit::Held;
            }
            match PROBATION.get_ptr_mut(m.receiver) {
                Some(entry) => entry,
                None => return Admit::Held,
            }
        }
    };
    // SAFETY: a live map value. Two CPUs holding messages of one index at once can lose
    // one of their updates, which only delays the promotion.
    let ready = window::probation_hold(unsafe { &mut *entry }, m.counter, m.keepalive, m.bytes);
    if !ready || !may_promote {
        return Admit::Held;
    }
    // SAFETY: as above; copied out before the entry goes.
    let held = unsafe { *entry };
    let _ = PROBATION.remove(m.receiver);
    stat(ProbeStat::SessionsPromoted);
    Admit::Promoted(held)
}

/// Starts a promoted session in `slot` from its probation `entry`, if the slot is still
/// free or its session has ended; returns whether it did. Otherwise (another CPU was
/// quicker) the held messages go uncounted and the index starts probation again.
///
/// # Safety
/// `slot` points at a live value of [`SESSION_SLOTS`].
#[inline(always)]
unsafe fn promote_in_slot(slot: *mut SessionState, m: &Received, entry: &ProbationSession) -> bool {
    // SAFETY: the caller's; nothing between lock and unlock calls a helper or returns
    // early, as the verifier enforces.
    unsafe {
        let lock = (&raw mut (*slot).lock).cast();
        bpf_spin_lock(lock);
        let held = (*slot).flags & SESSION_STARTED != 0;
        let take = !held || m.now.saturating_sub((*slot).last_seen_ns) > SESSION_EXPIRY_NS;
        if take {
            clear(slot);
            (*slot).receiver = m.receiver;
            window::start_promoted(&mut *slot, entry, m.now);
            (*slot).endpoint = *m.remote;
        }
        bpf_spin_unlock(lock);
        take
    }
}

/// What [`in_slot`] found in the slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The message's session; the message is counted.
    Ours,
    /// Nothing live: the slot now holds the message's session, which starts with it.
    Taken,
    /// Another live session; nothing was changed.
    Other,
}

/// Feeds the message into the session in `slot` under its lock, if the slot holds it, or
/// (with `may_take`) if the slot is free or its session has ended, in which case the slot
/// is cleared for the new session first.
///
/// # Safety
/// `slot` points at a live value of [`SESSION_SLOTS`].
#[inline(always)]
unsafe fn in_slot(slot: *mut SessionState, m: &Received, may_take: bool, fresh: bool) -> Slot {
    // SAFETY: the caller's; nothing between lock and unlock calls a helper or returns
    // early, as the verifier enforces.
    unsafe {
        let lock = (&raw mut (*slot).lock).cast();
        bpf_spin_lock(lock);
        let held = (*slot).flags & SESSION_STARTED != 0;
        let ours = held && (*slot).receiver == m.receiver;
        let take = !ours
            && may_take
            && (!held || m.now.saturating_sub((*slot).last_seen_ns) > SESSION_EXPIRY_NS);
        if take {
            clear(slot);
            (*slot).receiver = m.receiver;
        }
        if ours || take {
            count_in(&mut *slot, m, fresh);
        }
        bpf_spin_unlock(lock);
        if ours {
            Slot::Ours
        } else if take {
            Slot::Taken
        } else {
            Slot::Other
        }
    }
}

/// Whether `slot` holds the session of `receiver`, looked at under the slot's lock.
///
/// # Safety
/// `slot` points at a live value of [`SESSION_SLOTS`].
#[inline(always)]
unsafe fn holds(slot: *mut SessionState, receiver: u32) -> bool {
    // SAFETY: the caller's; nothing between lock and unlock calls a helper.
    unsafe {
        let lock = (&raw mut (*slot).lock).cast();
        bpf_spin_lock(lock);
        let ours = (*slot).flags & SESSION_STARTED != 0 && (*slot).receiver == receiver;
        bpf_spin_unlock(lock);
        ours
    }
}

/// Zeroes everything of a session but its lock: a new session starts from an all-zero
/// window (see `window::record_counter`).
///
/// # Safety
/// `slot` points at a live value of [`SESSION_SLOTS`] whose lock the caller holds.
#[inline(always)]
unsafe fn clear(slot: *mut SessionState) {
    // SAFETY: the caller's; the words after the first lie within the value, and the first
    // holds the lock (not touched) and the flags.
    unsafe {
        (*slot).flags = 0;
        let words = slot.cast::<u64>();
        let mut i = 1;
        while i < SESSION_WORDS {
            // Volatile, so that the compiler keeps the loop instead of calling memset: no
            // function call is allowed under a spin lock.
            core::ptr::write_volatile(words.add(i), 0);
            i += 1;
        }
    }
}

/// Words of a [`SessionState`]; the first holds the lock and the flags.
const SESSION_WORDS: usize = core::mem::size_of::<SessionState>() / 8;

/// Feeds the message into its session in [`SESSIONS`], creating it when there is none and
/// this host announced its index. `slot` is the session's slot, which another live session
/// held when the message came.
#[inline(always)]
fn in_hash(m: &Received, slot: Option<*mut SessionState>) -> bool {
    let state = match SESSIONS.get_ptr_mut(m.receiver) {
        Some(state) => state,
        None => {
            // Its slot is taken: an index this host did not announce waits in probation
            // (and never leaves it for the hash) rather than take room that real new
            // sessions need.
            if let Admit::Held | Admit::Promoted(_) = admit(m, false) {
                return true;
            }
            // SAFETY: ZERO_SESSION has the size of SessionState and all-zero bytes, a valid
            // (unstarted) session; the kernel copies it and leaves the lock to itself.
            let zero = unsafe { &*(&raw const ZERO_SESSION).cast::<SessionState>() };
            match SESSIONS.insert(m.receiver, zero, u64::from(BPF_NOEXIST)) {
                Ok(()) => {
                    session_created(m);
                    // The other half of the check in `receive`: another CPU may have taken
                    // the slot for this session since. Under the slot's lock, whose taking
                    // orders this look after the insert on every CPU.
                    // SAFETY: a value of SESSION_SLOTS, whose BTF has the lock.
                    if slot.is_some_and(|slot| unsafe { holds(slot, m.receiver) }) {
                        stat(ProbeStat::SessionsSplit);
                    }
                }
                Err(e) if e == -EEXIST => {}
                Err(e) => {
                    stat(if e == -ENOMEM {
                        ProbeStat::AllocationFailure
                    } else {
                        ProbeStat::SessionOverflow
                    });
                    return false;
                }
            }
            match SESSIONS.get_ptr_mut(m.receiver) {
                Some(state) => state,
                None => return false,
            }
        }
    };
    // Read without the lock: the hint only matters for the first counter, and every CPU
    // racing on it computes the same answer (the fresh entry is not removed).
    // SAFETY: a live map value; a torn read of one u32 flag is impossible.
    let started = unsafe { (*state).flags } & SESSION_STARTED != 0;
    let fresh = !started && is_fresh(m.receiver, m.now);
    // SAFETY: `state` points at a live map value whose BTF has a bpf_spin_lock at `lock`;
    // nothing between lock and unlock calls a helper or returns early, as the verifier
    // enforces.
    unsafe {
        let lock = (&raw mut (*state).lock).cast();
        bpf_spin_lock(lock);
        count_in(&mut *state, m, fresh);
        bpf_spin_unlock(lock);
    }
    true
}

/// Counts the message in its session, whose lock the caller holds.
#[inline(always)]
fn count_in(s: &mut SessionState, m: &Received, fresh: bool) {
    let (timeout, checkpoint) = timeouts();
    window::receive(
        s,
        m.counter,
        m.keepalive,
        m.bytes,
        fresh,
        m.now,
        timeout,
        checkpoint,
    );
    s.endpoint = *m.remote;
}

/// Counts a new session and makes its endpoint known, so that what else the endpoint sends
/// (malformed messages) is counted as its own. Once per session, off the per-message path;
/// the agent tracks the endpoints of roaming peers.
#[inline(always)]
fn session_created(m: &Received) {
    stat(ProbeStat::SessionsCreated);
    let _ = endpoint(m.remote, true, m.now);
}

/// The reorder timeout and the checkpoint width.
#[inline(always)]
fn timeouts() -> (u64, u64) {
    // SAFETY: read-only globals the loader may have rewritten; volatile so that the
    // compiler does not fold the defaults in.
    unsafe {
        (
            core::ptr::read_volatile(&REORDER_TIMEOUT_NS),
            core::ptr::read_volatile(&CHECKPOINT_NS),
        )
    }
}

#[inline(always)]
fn is_fresh(receiver: u32, now: u64) -> bool {
    // SAFETY: the value is copied out at once; an LRU eviction in between only loses the
    // hint.
    match unsafe { FRESH_SESSIONS.get(receiver) } {
        Some(f) => now.saturating_sub(f.announced_ns) < REJECT_AFTER_NS,
        None => false,
    }
}

// Nothing the programs run can panic (no indexing, no unwrap, no overflow checks in these
// profiles), and the verifier would reject a program that could reach this loop.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
