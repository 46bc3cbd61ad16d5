//! The contract between the kernel programs and the agent.
//!
//! Every BPF map the agent reads is named and laid out here, and only here. Layouts are
//! `#[repr(C)]` with explicit padding and a size assertion each, because the kernel side and
//! userspace are compiled by different compilers for different targets.
//!
//! The read side of the loss window ([`SessionState::settle_mark`], [`SessionState::lost`])
//! lives here too: the kernel decides with it whether a late counter still counts as
//! received, and the agent computes the lost count with it, so both must use one formula.
#![no_std]

/// Name of the TC program attached to the ingress hook of an underlay interface.
pub const PROG_INGRESS: &str = "plexd_tc_ingress";
/// Name of the TC program attached to the egress hook of an underlay interface.
pub const PROG_EGRESS: &str = "plexd_tc_egress";
/// Name of a TC program that only counts packets, like the first version of the agent did.
/// The agent never attaches it; `cargo xtask bench` measures it as the baseline.
pub const PROG_COUNT_ONLY: &str = "plexd_tc_count";

/// Name of the per-CPU array that holds [`PacketCounters`], indexed by [`Direction`].
pub const MAP_PACKET_COUNTERS: &str = "PACKET_COUNTERS";
/// Name of the one-entry array holding the [`PortSet`] of WireGuard listen ports.
pub const MAP_LISTEN_PORTS: &str = "LISTEN_PORTS";
/// Name of the per-CPU hash of [`EndpointStats`] keyed by [`EndpointKey`].
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// Name of the array of [`SessionState`] where a session lives first: the slot
/// [`session_slot`] picks for its receiver index, tagged with that index. Values carry a
/// `bpf_spin_lock`; read them with `BPF_F_LOCK`.
pub const MAP_SESSION_SLOTS: &str = "SESSION_SLOTS";
/// Name of the hash of [`SessionState`] keyed by the receiver index (`u32`) of incoming
/// transport messages: sessions whose slot another live session holds. Values carry a
/// `bpf_spin_lock`; read them with `BPF_F_LOCK`.
pub const MAP_SESSIONS: &str = "SESSIONS";
/// Name of the LRU hash of receiver indexes this host just announced in a handshake
/// (`u32` → [`FreshSession`]): their sessions start at counter 0.
pub const MAP_FRESH_SESSIONS: &str = "FRESH_SESSIONS";
/// Name of the LRU hash of receiver indexes no handshake of this host announced (`u32` →
/// [`ProbationSession`]): their first messages wait here until they look like a session
/// ([`CONFIRM_COUNTERS`] counters close together), so that datagrams with made-up indexes
/// take no loss window from a real session. A flood only evicts other probation entries.
pub const MAP_PROBATION: &str = "PROBATION";
/// Name of the per-CPU array of probe-wide counters, indexed by [`ProbeStat`].
pub const MAP_PROBE_STATS: &str = "PROBE_STATS";

/// Name of the read-only global holding the reorder timeout in nanoseconds.
pub const GLOBAL_REORDER_TIMEOUT_NS: &str = "REORDER_TIMEOUT_NS";
/// Name of the read-only global holding the width of one [`Checkpoint`] in nanoseconds.
pub const GLOBAL_CHECKPOINT_NS: &str = "CHECKPOINT_NS";
/// Name of the read-only global holding the shift of [`session_slot`]: 32 minus the base-2
/// logarithm of the entries of [`MAP_SESSION_SLOTS`].
pub const GLOBAL_SESSION_SLOT_SHIFT: &str = "SESSION_SLOT_SHIFT";

/// Default of `metrics.ebpf.max_peers`: entries of [`MAP_ENDPOINTS`].
pub const DEFAULT_MAX_ENDPOINTS: u32 = 16_384;
/// Default of `metrics.ebpf.max_sessions`: entries of [`MAP_SESSIONS`].
pub const DEFAULT_MAX_SESSIONS: u32 = 65_536;
/// Default reorder timeout (1 s), compiled into the object; the agent overrides it at load.
pub const DEFAULT_REORDER_TIMEOUT_NS: u64 = 1_000_000_000;
/// Entries of [`MAP_SESSION_SLOTS`] compiled into the object: those of the default
/// `metrics.ebpf.max_peers` ([`session_slots`]).
pub const DEFAULT_SESSION_SLOTS: u32 = session_slots(DEFAULT_MAX_ENDPOINTS);
/// A session idle this long has ended: WireGuard rejects its messages after 180 s
/// (REJECT_AFTER_TIME). The agent removes it from [`MAP_SESSIONS`] then, and a new session
/// may take its slot in [`MAP_SESSION_SLOTS`]; its lost count is final long before.
pub const SESSION_EXPIRY_NS: u64 = 240_000_000_000;

/// Entries of [`MAP_SESSION_SLOTS`] for a node of up to `max_endpoints` peers: a power of
/// two, a quarter of the peers rounded up, from 64 to 65,536.
///
/// A quarter keeps the array small (4,096 slots of 512 bytes, 2 MB, at the default 16,384
/// peers) while most nodes have far fewer peers than their limit; a session whose slot is
/// taken still counts exactly, in [`MAP_SESSIONS`], only at the cost of a hash lookup.
pub const fn session_slots(max_endpoints: u32) -> u32 {
    let quarter = max_endpoints.div_ceil(4);
    let slots = if quarter <= 64 {
        64
    } else {
        quarter.next_power_of_two()
    };
    if slots > 65_536 {
        65_536
    } else {
        slots
    }
}

/// The value of [`GLOBAL_SESSION_SLOT_SHIFT`] for `slots` entries (a power of two).
pub const fn session_slot_shift(slots: u32) -> u32 {
    32 - slots.trailing_zeros()
}

/// The slot of receiver index `receiver` in [`MAP_SESSION_SLOTS`].
///
/// Fibonacci hashing (the top bits of a product with 2^32 / golden ratio): receiver indexes
/// are random in WireGuard's kernel and Go implementations, but other implementations
/// number their sessions in the low bits, and the product spreads those over all slots.
#[inline(always)]
pub const fn session_slot(receiver: u32, shift: u32) -> u32 {
    receiver.wrapping_mul(0x9e37_79b9) >> (shift & 31)
}

/// Which TC hook saw a packet; the index into [`MAP_PACKET_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Packets arriving on the interface.
    Ingress = 0,
    /// Packets leaving through the interface.
    Egress = 1,
}

/// Number of entries in [`MAP_PACKET_COUNTERS`].
pub const DIRECTIONS: u32 = 2;

/// Packets and bytes seen by one hook on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounters {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen, counting from the start of the link-layer header.
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<PacketCounters>() == 16);

/// The set of UDP ports WireGuard listens on: bit `p` of the bitmap is port `p`.
///
/// A bitmap in one array entry, because the verifier inlines array lookups: checking a port
/// costs a few instructions and no hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSet {
    /// 65,536 bits, port `p` at bit `p % 64` of word `p / 64`.
    pub words: [u64; 1024],
}

const _: () = assert!(core::mem::size_of::<PortSet>() == 8192);

impl Default for PortSet {
    fn default() -> Self {
        Self { words: [0; 1024] }
    }
}

impl PortSet {
    /// Adds `port`.
    #[inline(always)]
    pub fn insert(&mut self, port: u16) {
        self.words[usize::from(port >> 6)] |= 1 << (port & 63);
    }

    /// Whether `port` is in the set.
    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        self.words[usize::from(port >> 6) & 1023] & (1 << (port & 63)) != 0
    }
}

/// A remote UDP endpoint: IPv6 address (IPv4 as `::ffff:a.b.c.d`) and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// Address bytes in network order.
    pub addr: [u8; 16],
    /// UDP port in host order.
    pub port: u16,
    /// Always zero, so that equal endpoints hash equally.
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<EndpointKey>() == 20);

impl EndpointKey {
    /// The key for an IPv4 endpoint.
    #[inline(always)]
    pub fn v4(addr: [u8; 4], port: u16) -> Self {
        Self {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
            ],
            port,
            _pad: 0,
        }
    }

    /// The key for an IPv6 endpoint.
    #[inline(always)]
    pub fn v6(addr: [u8; 16], port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
        }
    }

    /// The IPv4 address if this is an IPv4-mapped key.
    pub fn ipv4(&self) -> Option<[u8; 4]> {
        let a = &self.addr;
        (a[..10].iter().all(|&b| b == 0) && a[10] == 0xff && a[11] == 0xff)
            .then(|| [a[12], a[13], a[14], a[15]])
    }
}

/// What the programs count per remote endpoint, on one CPU. The agent sums the CPUs.
///
/// Every message counted here passed the size checks of its type; anything else on a
/// WireGuard port is `malformed`. Received transport messages are counted in their session
/// ([`SessionRx`]); the `rx_` fields here count only those of sessions the map had no room
/// for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Transport messages received without a session to count them in (keepalives and
    /// duplicates included).
    pub rx_packets: u64,
    /// Bytes of those, from the link-layer header on.
    pub rx_bytes: u64,
    /// Transport messages sent (keepalives included).
    pub tx_packets: u64,
    /// Bytes of those, from the link-layer header on.
    pub tx_bytes: u64,
    /// Keepalives (transport messages without payload) received.
    pub rx_keepalives: u64,
    /// Keepalives sent.
    pub tx_keepalives: u64,
    /// Handshake initiations sent to the endpoint.
    pub initiations_sent: u64,
    /// Handshake initiations received from it.
    pub initiations_received: u64,
    /// Handshake responses sent to it.
    pub responses_sent: u64,
    /// Handshake responses received from it.
    pub responses_received: u64,
    /// Cookie replies sent to it.
    pub cookies_sent: u64,
    /// Cookie replies received from it.
    pub cookies_received: u64,
    /// Packets to or from a WireGuard port that are no valid WireGuard message.
    pub malformed: u64,
    /// `bpf_ktime_get_coarse_ns` of the last message on this CPU.
    pub last_seen_ns: u64,
}

const _: () = assert!(core::mem::size_of::<EndpointStats>() == 112);

/// Probe-wide counters, the index into [`MAP_PROBE_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeStat {
    /// Messages of endpoints [`MAP_ENDPOINTS`] had no room for (not counted per endpoint).
    EndpointOverflow = 0,
    /// Transport messages of sessions [`MAP_SESSIONS`] had no room for (no loss measured).
    SessionOverflow = 1,
    /// Malformed packets from endpoints that have no entry (not given one, so that junk
    /// sent to the port cannot push real peers out of the map).
    MalformedUnknown = 2,
    /// Sessions created.
    SessionsCreated = 3,
    /// Entries that could not be created because the kernel had no memory at hand. Maps are
    /// not preallocated, and a burst of new entries can drain the per-CPU caches the kernel
    /// refills in the background; the next message of the endpoint or session tries again.
    AllocationFailure = 4,
    /// Sessions that began both in their slot and in [`MAP_SESSIONS`]: two CPUs took their
    /// first messages at the very moment the session holding the slot expired. Each part
    /// sees the other's messages as holes, so the session's loss is overstated.
    SessionsSplit = 5,
    /// Transport messages held in [`MAP_PROBATION`]: of receiver indexes no handshake of this
    /// host announced, before they had a window. Sessions that began before the programs
    /// were attached send a few; made-up indexes send them all.
    ProbationMessages = 6,
    /// Sessions that left probation for a window (free slots only: an index this host never
    /// announced takes no room in [`MAP_SESSIONS`], which real new sessions need).
    SessionsPromoted = 7,
}

/// Number of entries in [`MAP_PROBE_STATS`].
pub const PROBE_STAT_COUNT: u32 = 8;

/// Counters covered by a session's window: reordering up to this distance behind the
/// highest counter is told apart from loss.
pub const WINDOW_BITS: u64 = 2048;
/// Words of the window bitmap.
pub const WINDOW_WORDS: usize = (WINDOW_BITS / 64) as usize;
/// A counter more than this far above a session's highest is provisional: WireGuard has not
/// authenticated the message yet, and one forged datagram must not move the window. One
/// word of the bitmap: a real sender's counters only jump this far after 64 messages in a
/// row were lost or delayed.
pub const PROVISIONAL_JUMP: u64 = 64;
/// Distinct counters within a provisional candidate's 64-counter range that confirm it as
/// the session's sequence ([`SessionState::pending`]).
pub const CONFIRM_COUNTERS: u32 = 4;
/// Checkpoints kept per session (see [`Checkpoint`]).
pub const CHECKPOINTS: usize = 4;

/// The kernel's `struct bpf_spin_lock`. The verifier recognises the lock by this exact BTF
/// name and size, so the type keeps the kernel's name.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct bpf_spin_lock {
    /// Owned by the kernel; userspace reads zero through `BPF_F_LOCK`.
    pub val: u32,
}

/// The highest counter of a session as of a moment: every hole below `highest` has been
/// open since `last_ns` at the latest.
///
/// One checkpoint covers the packets of at most [`GLOBAL_CHECKPOINT_NS`] (a third of the
/// reorder timeout): a new one starts when the newest is that old. With [`CHECKPOINTS`]
/// of them, the oldest is always past the timeout before it is overwritten, so overwriting
/// loses nothing (its mark has been folded into [`SessionState::settled_below`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The session's highest counter after the last packet of this checkpoint.
    pub highest: u64,
    /// Time of the first packet of this checkpoint.
    pub first_ns: u64,
    /// Time of the last packet of this checkpoint.
    pub last_ns: u64,
}

/// [`SessionState::flags`]: a transport message has been seen.
pub const SESSION_STARTED: u32 = 1;

/// The loss window of one WireGuard session (one receiver index), shared by all CPUs and
/// guarded by `lock`.
///
/// A counter `c` is *received* when it arrives for the first time while not yet settled;
/// `received` counts those at or above `base`. Counters below the settle mark
/// ([`SessionState::settle_mark`]) are settled: if they were never received they are lost,
/// and if they arrive after all they are late but stay lost. So the lost count never goes
/// down, and a counter is lost or received, never both.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionState {
    /// The spin lock; first, as the kernel requires nothing of its place but tools show it.
    pub lock: bpf_spin_lock,
    /// [`SESSION_STARTED`].
    pub flags: u32,
    /// Lowest counter the session is accounted from: 0 for sessions this host saw start,
    /// else the first counter seen.
    pub base: u64,
    /// Highest counter seen.
    pub highest: u64,
    /// Counters at or above `base` received before being settled.
    pub received: u64,
    /// The settle mark as of the last packet (monotonic).
    pub settled_below: u64,
    /// Time of the last transport message.
    pub last_seen_ns: u64,
    /// Recent highest counters with their times; a ring, `newest` is the latest.
    pub checkpoints: [Checkpoint; CHECKPOINTS],
    /// Index of the newest checkpoint (valid once started).
    pub newest: u32,
    /// The receiver index of the session in a slot of [`MAP_SESSION_SLOTS`], its tag, set
    /// when the session takes the slot. Zero in [`MAP_SESSIONS`], which is keyed by it.
    pub receiver: u32,
    /// The remote endpoint of the last transport message (peers may roam).
    pub endpoint: EndpointKey,
    /// Messages held in the candidate (`pending_bits`), keepalives and duplicates included.
    pub pending_packets: u32,
    /// The lowest counter of the candidate's range: counters more than [`PROVISIONAL_JUMP`]
    /// above `highest` arrive here first, in the 64 counters from `pending` on, until
    /// [`CONFIRM_COUNTERS`] of them confirm the jump or a message continuing from `highest`
    /// shows them forged (they are then counted in [`SessionRx::suspect`]). Meaningful
    /// while `pending_bits` is not zero.
    pub pending: u64,
    /// Which counters of the candidate's range arrived: bit `i` is counter `pending + i`.
    /// Zero when there is no candidate.
    pub pending_bits: u64,
    /// Bytes of the messages held in the candidate.
    pub pending_bytes: u64,
    /// Keepalives among the messages held in the candidate.
    pub pending_keepalives: u32,
    /// Always zero.
    pub _pad: u32,
    /// What the session received, counted here rather than per endpoint: the lock is held
    /// anyway, and the ingress path saves a hash lookup per message.
    pub rx: SessionRx,
    /// Which of the last [`WINDOW_BITS`] counters arrived: counter `c` is bit `c % 64` of
    /// word `(c / 64) % WINDOW_WORDS`.
    pub window: [u64; WINDOW_WORDS],
}

const _: () = assert!(core::mem::size_of::<SessionState>() == 512);

/// Transport messages a session received, cumulative since it was created. The agent adds
/// them to the endpoint the session last heard from (see [`SessionState::endpoint`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionRx {
    /// Transport messages (keepalives, late and duplicate ones included).
    pub packets: u64,
    /// Bytes of those, from the link-layer header on.
    pub bytes: u64,
    /// Keepalives (transport messages without payload).
    pub keepalives: u64,
    /// Messages whose counter was new but below the highest: reordered, or arriving after
    /// their hole was settled as lost.
    pub late: u64,
    /// Messages whose counter had been seen before.
    pub duplicate: u64,
    /// Messages WireGuard would reject: counters far ahead of the session's sequence that
    /// the messages after them showed forged. Counted in none of the fields above, nor as
    /// received or lost.
    pub suspect: u64,
}

const _: () = assert!(core::mem::size_of::<SessionRx>() == 48);

impl Default for SessionState {
    fn default() -> Self {
        Self {
            lock: bpf_spin_lock::default(),
            flags: 0,
            base: 0,
            highest: 0,
            received: 0,
            settled_below: 0,
            last_seen_ns: 0,
            checkpoints: [Checkpoint::default(); CHECKPOINTS],
            newest: 0,
            receiver: 0,
            endpoint: EndpointKey::default(),
            pending_packets: 0,
            pending: 0,
            pending_bits: 0,
            pending_bytes: 0,
            pending_keepalives: 0,
            _pad: 0,
            rx: SessionRx::default(),
            window: [0; WINDOW_WORDS],
        }
    }
}

/// Value of [`MAP_PROBATION`]: the first messages of a receiver index no handshake of this
/// host announced, as a candidate range like [`SessionState::pending`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbationSession {
    /// The lowest counter of the range.
    pub first: u64,
    /// Which counters of the range arrived: bit `i` is counter `first + i`.
    pub bits: u64,
    /// Bytes of the messages held.
    pub bytes: u64,
    /// Messages held, keepalives and duplicates included.
    pub packets: u32,
    /// Keepalives among them.
    pub keepalives: u32,
}

const _: () = assert!(core::mem::size_of::<ProbationSession>() == 32);

/// Value of [`MAP_FRESH_SESSIONS`]: when this host announced the receiver index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreshSession {
    /// `bpf_ktime_get_coarse_ns` of the handshake message.
    pub announced_ns: u64,
}

const _: () = assert!(core::mem::size_of::<FreshSession>() == 8);

/// The width of one checkpoint for a reorder timeout: a third of it, rounded up, at least
/// 1 ns (see [`Checkpoint`] for why a third).
pub const fn checkpoint_ns(reorder_timeout_ns: u64) -> u64 {
    let third = reorder_timeout_ns.div_ceil(CHECKPOINTS as u64 - 1);
    if third == 0 {
        1
    } else {
        third
    }
}

impl SessionState {
    /// Whether a transport message has been seen.
    #[inline(always)]
    pub fn started(&self) -> bool {
        self.flags & SESSION_STARTED != 0
    }

    /// Counters below the returned mark are settled at `now_ns`: a hole there is lost.
    ///
    /// A hole is settled when it has been open for `timeout_ns` (it lies below the highest
    /// counter of a checkpoint at least that old) or when it left the window.
    #[inline(always)]
    pub fn settle_mark(&self, now_ns: u64, timeout_ns: u64) -> u64 {
        let mut mark = self.settled_below;
        // Unused checkpoints are all zeros: they qualify, and raise the mark to nothing.
        // No separate "in use" count is consulted: each comparison with one doubles the
        // paths the verifier walks.
        let mut i = 0;
        while i < CHECKPOINTS {
            let cp = &self.checkpoints[i];
            if cp.last_ns.saturating_add(timeout_ns) <= now_ns && cp.highest > mark {
                mark = cp.highest;
            }
            i += 1;
        }
        let bottom = self.highest.saturating_sub(WINDOW_BITS - 1);
        if bottom > mark {
            mark = bottom;
        }
        mark
    }

    /// Whether counter `c` (within the window) has arrived.
    #[inline(always)]
    pub fn has(&self, c: u64) -> bool {
        self.window[((c >> 6) as usize) & (WINDOW_WORDS - 1)] & (1 << (c & 63)) != 0
    }

    /// Arrived counters in `from..=self.highest`, where `from` lies within the window.
    pub fn arrived_from(&self, from: u64) -> u64 {
        if !self.started() || from > self.highest {
            return 0;
        }
        // Counts whole words through masks instead of bit by bit: this runs for every
        // session at every collect.
        let mut count = 0u64;
        let mut c = from;
        loop {
            let word_end = c | 63;
            let last = if word_end >= self.highest {
                self.highest
            } else {
                word_end
            };
            let lo = c & 63;
            let hi = last & 63;
            let width = hi - lo + 1;
            let mask = if width == 64 {
                u64::MAX
            } else {
                ((1u64 << width) - 1) << lo
            };
            let word = self.window[((c >> 6) as usize) & (WINDOW_WORDS - 1)];
            count += u64::from((word & mask).count_ones());
            if last == self.highest {
                return count;
            }
            c = last + 1;
        }
    }

    /// Transport messages of this session settled as lost at `now_ns`.
    ///
    /// RFC 3550's expected − received, over the settled range only: counters in
    /// `base..mark` minus those of them that were received.
    pub fn lost(&self, now_ns: u64, timeout_ns: u64) -> u64 {
        if !self.started() {
            return 0;
        }
        let mark = self.settle_mark(now_ns, timeout_ns);
        if mark <= self.base {
            return 0;
        }
        // Every arrived counter at or above the mark (and the base) was counted as
        // received: it arrived while not yet settled, the mark only ever grows.
        let received_above = self.arrived_from(mark);
        let received_below = self.received.saturating_sub(received_above);
        (mark - self.base).saturating_sub(received_below)
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY (all below): the types are repr(C), their sizes are asserted above with all
    // padding spelled out as fields, and every bit pattern is valid for them.
    unsafe impl aya::Pod for PacketCounters {}
    unsafe impl aya::Pod for PortSet {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointStats {}
    unsafe impl aya::Pod for SessionState {}
    unsafe impl aya::Pod for FreshSession {}
    unsafe impl aya::Pod for ProbationSession {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn a_slot_per_four_peers_in_powers_of_two_within_bounds() {
        assert_eq!(DEFAULT_SESSION_SLOTS, 4_096);
        assert_eq!(session_slots(10_000), 4_096);
        assert_eq!(session_slots(16_385), 8_192);
        assert_eq!(session_slots(1), 64);
        assert_eq!(session_slots(300), 128);
        assert_eq!(session_slots(4_194_304), 65_536);
        assert_eq!(session_slot_shift(4_096), 20);
        assert_eq!(session_slot_shift(65_536), 16);
    }

    #[test]
    fn numbered_sessions_spread_over_the_slots() {
        // Implementations that number sessions in the low byte (peer << 8 | session) would
        // pile up in a few slots if the index were simply masked.
        let shift = session_slot_shift(4_096);
        let mut used = std::collections::BTreeSet::new();
        for peer in 0..1_024u32 {
            let slot = session_slot((peer << 8) | 3, shift);
            assert!(slot < 4_096);
            used.insert(slot);
        }
        // 1,024 random indexes would take about 906 distinct slots.
        assert!(used.len() > 900, "{} distinct slots", used.len());
        assert_eq!(session_slot(u32::MAX, 16) >> 16, 0);
    }
}
