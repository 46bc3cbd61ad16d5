//! The per-session loss window: what one arriving transport counter does to it.
//!
//! The state and its read side (settle mark, lost count) are defined in
//! `plexd-metrics-common`, because the agent computes the lost count from the same state.
//! The caller holds the session's spin lock around [`record_counter`]; nothing here calls a
//! helper or allocates, as the verifier demands inside a lock.
//!
//! The bitmap is a ring of [`WINDOW_WORDS`] words indexed by counter, as RFC 6479 suggests,
//! so moving the window forward clears words instead of shifting bits. Unlike RFC 6479's
//! anti-replay window no slack word is kept: the window is exactly [`WINDOW_BITS`] counters,
//! and the bits of counters that enter it are cleared one range at a time.
//!
//! # Messages WireGuard will reject
//!
//! The programs see a message before WireGuard authenticates it, so anyone who knows (or
//! guesses) a receiver index can send a datagram with any counter. A counter far ahead would
//! move the window at once: the whole gap reported as lost, and the real messages that follow
//! taken as too old. So a jump of more than [`PROVISIONAL_JUMP`] counters above the highest
//! is *provisional*: the window stays where it is and the message is held in the session's
//! candidate ([`SessionState::pending`]), a 64-counter range around it.
//!
//! - The candidate is **confirmed** when [`CONFIRM_COUNTERS`] distinct counters of its range
//!   have arrived: then the window moves to the highest of them, they count as received (in
//!   order), and the gap they left is loss like any other. This is how a real burst loss
//!   longer than the jump limit is counted, exactly: the real sender goes on counting from
//!   where the burst ended.
//! - It is **forged** when the old sequence goes on (a message within [`PROVISIONAL_JUMP`]
//!   above the highest) while the candidate lies more than [`WINDOW_BITS`] ahead. A real
//!   sender cannot continue both sequences, a burst loss leaves nothing of the old one to
//!   arrive, and no reordering the window could tell reaches that far. The candidate's
//!   messages are then counted as `suspect` ([`SessionRx::suspect`]), never as received,
//!   late or lost, and the window is as if they never came.
//! - A candidate less than a window ahead may be real messages that overtook others: it
//!   stays while the old sequence goes on, and is taken in (as received) once the sequence
//!   reaches its range; the messages below it that arrive after that are late.
//! - A far counter outside the candidate's range replaces the candidate, whose messages are
//!   counted as suspect: only one of the two sequences can be real, and the new one is the
//!   more recent.
//!
//! Late and duplicate messages of the old sequence neither confirm nor reject: they are what
//! both a real burst (reordered stragglers) and a forgery (replays) produce. A provisional
//! message is not counted in `rx` until the candidate is settled either way.
//!
//! What this leaves to an attacker who knows the index:
//!
//! - A counter at most [`PROVISIONAL_JUMP`] ahead is taken as it comes, as every in-order
//!   message must be for the path to stay cheap. The holes it opens are filled by the real
//!   messages, which count as late; the real message with the forged counter counts as a
//!   duplicate. Loss stays exact unless that very real message is lost too (then one lost
//!   message per forged one goes uncounted).
//! - A counter less than a window ahead is taken as an early message once the sequence
//!   reaches it, with the same effects (and fewer late messages).
//! - [`CONFIRM_COUNTERS`] forged counters within 64 of each other, all sent before the
//!   session's next real message, look exactly like a real burst loss and are confirmed. A
//!   busy session's real traffic leaves microseconds for that; an idle one leaves time.
//! - A far counter sent while a real burst loss is being confirmed replaces the real
//!   candidate: up to [`CONFIRM_COUNTERS`] − 1 real messages are counted as suspect, and
//!   their counters as lost.

#[cfg(doc)]
use plexd_metrics_common::SessionRx;
use plexd_metrics_common::{
    Checkpoint, ProbationSession, SessionState, CHECKPOINTS, CONFIRM_COUNTERS, PROVISIONAL_JUMP,
    SESSION_STARTED, WINDOW_BITS, WINDOW_WORDS,
};

/// Counters of a candidate's range that lie below the counter that opened it: a real
/// sender's messages after a burst loss may arrive slightly reordered.
const CANDIDATE_BELOW: u64 = 16;

/// How an arriving counter relates to what the session has seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The first counter of the session, or above the highest so far.
    InOrder,
    /// New, but below the highest: reordered in the network. Also counters that arrive
    /// after their hole was settled as lost, and counters too far behind to tell (the
    /// window has moved past them).
    Late,
    /// Seen before.
    Duplicate,
    /// Far ahead of the highest: held in the session's candidate until more messages
    /// confirm it or the old sequence shows it forged (see the module's documentation).
    Provisional,
}

/// Accounts a transport message of `bytes` bytes on the wire with counter `counter`,
/// arriving at `now_ns`: its place in the window ([`record_counter`]) and the session's
/// receive counters.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // the caller's scalars, passed on unchanged
pub fn receive(
    s: &mut SessionState,
    counter: u64,
    keepalive: bool,
    bytes: u64,
    fresh: bool,
    now_ns: u64,
    timeout_ns: u64,
    checkpoint_ns: u64,
) -> Arrival {
    let arrival = record_counter(s, counter, fresh, now_ns, timeout_ns, checkpoint_ns);
    if arrival == Arrival::Provisional {
        // Counted in `rx` (or as suspect) once the candidate is settled.
        s.pending_packets += 1;
        s.pending_bytes += bytes;
        if keepalive {
            s.pending_keepalives += 1;
        }
        return arrival;
    }
    let rx = &mut s.rx;
    rx.packets += 1;
    rx.bytes += bytes;
    if keepalive {
        rx.keepalives += 1;
    }
    match arrival {
        Arrival::Late => rx.late += 1,
        Arrival::Duplicate => rx.duplicate += 1,
        Arrival::InOrder | Arrival::Provisional => {}
    }
    arrival
}

/// Accounts counter `counter` arriving at `now_ns`.
///
/// `fresh` says whether the session was announced in a handshake this host sent: its
/// counters then start at 0 and a loss of the very first message is noticed. It only
/// matters for the first counter of a session.
///
/// `timeout_ns` is the reorder timeout; `checkpoint_ns` the width of one checkpoint
/// ([`plexd_metrics_common::checkpoint_ns`]).
#[inline(always)]
pub fn record_counter(
    s: &mut SessionState,
    counter: u64,
    fresh: bool,
    now_ns: u64,
    timeout_ns: u64,
    checkpoint_ns: u64,
) -> Arrival {
    if !s.started() {
        // The window is still all zeros: sessions are created zeroed and start only here.
        begin(s, if fresh { 0 } else { counter }, counter, 1, now_ns);
        set_bit(s, counter);
        return Arrival::InOrder;
    }
    s.last_seen_ns = now_ns;
    if counter > s.highest {
        // One call of `advance` for all ways forward: each copy is a loop the verifier walks.
        let mut to = counter;
        let mut confirmed = 0;
        let mut merged = false;
        if counter - s.highest > PROVISIONAL_JUMP {
            hold(s, counter);
            confirmed = s.pending_bits.count_ones();
            if confirmed < CONFIRM_COUNTERS {
                return Arrival::Provisional;
            }
            to = candidate_top(s);
        } else if s.pending_bits != 0 {
            if counter >= s.pending {
                // The sequence reached the candidate: its messages overtook the ones
                // before them, and count as received like any early message.
                confirmed = s.pending_bits.count_ones();
                merged = true;
                let top = candidate_top(s);
                if top > to {
                    to = top;
                }
            } else if s.pending - s.highest > WINDOW_BITS {
                // The old sequence goes on, and no reordering reaches that far ahead: the
                // candidate was forged.
                reject(s);
            }
        }
        advance(s, to);
        if confirmed != 0 {
            confirm(s, confirmed);
        }
        if merged && s.has(counter) {
            checkpoint(s, now_ns, timeout_ns, checkpoint_ns);
            return Arrival::Duplicate;
        }
        if confirmed == 0 || merged {
            set_bit(s, counter);
            s.received += 1;
        }
        checkpoint(s, now_ns, timeout_ns, checkpoint_ns);
        // Below a candidate taken in it arrived after a later message. The messages of a
        // confirmed candidate are not told apart, like those it held.
        return if merged && counter < s.highest {
            Arrival::Late
        } else {
            Arrival::InOrder
        };
    }
    // Counters below the settle mark that arrive now no longer count as received. Only
    // needed here: a counter above the highest is received whatever the mark.
    let mark = s.settle_mark(now_ns, timeout_ns);
    s.settled_below = mark;
    if s.highest - counter >= WINDOW_BITS {
        return Arrival::Late;
    }
    if s.has(counter) {
        return Arrival::Duplicate;
    }
    set_bit(s, counter);
    if counter >= mark && counter >= s.base {
        s.received += 1;
    }
    Arrival::Late
}

/// Holds a counter far above the highest in the session's candidate, opening a new
/// candidate (and rejecting the old one) when it lies outside the current one's range.
#[inline(always)]
fn hold(s: &mut SessionState, counter: u64) {
    if !in_range(s.pending, s.pending_bits, counter) {
        reject(s);
        s.pending = range_start(counter);
    }
    s.pending_bits |= 1 << ((counter - s.pending) & 63);
}

/// Whether `counter` lies in the candidate range from `first` whose arrivals are `bits`
/// (none when `bits` is zero).
#[inline(always)]
fn in_range(first: u64, bits: u64, counter: u64) -> bool {
    bits != 0 && counter >= first && counter - first <= 63
}

/// The first counter of a candidate range opened by `counter`.
#[inline(always)]
fn range_start(counter: u64) -> u64 {
    counter.saturating_sub(CANDIDATE_BELOW)
}

/// Holds a message of a receiver index no handshake of this host announced in its
/// probation entry; returns whether enough counters close together arrived to give it a
/// window ([`start_promoted`]). A counter outside the entry's range starts it again: what
/// it held goes uncounted, as the messages of a session before the programs saw it do.
#[inline(always)]
pub fn probation_hold(p: &mut ProbationSession, counter: u64, keepalive: bool, bytes: u64) -> bool {
    if !in_range(p.first, p.bits, counter) {
        *p = ProbationSession {
            first: range_start(counter),
            ..ProbationSession::default()
        };
    }
    p.bits |= 1 << ((counter - p.first) & 63);
    p.packets += 1;
    p.bytes += bytes;
    if keepalive {
        p.keepalives += 1;
    }
    p.bits.count_ones() >= CONFIRM_COUNTERS
}

/// Starts a new (all-zero) session from its probation entry at `now_ns`: the window begins
/// at the lowest counter held and reaches the highest, and the held messages are its first.
#[inline(always)]
pub fn start_promoted(s: &mut SessionState, p: &ProbationSession, now_ns: u64) {
    let top = p.first + u64::from(63 - p.bits.leading_zeros());
    let base = p.first + u64::from(p.bits.trailing_zeros());
    begin(s, base, top, u64::from(p.bits.count_ones()), now_ns);
    place_range(s, p.first, p.bits);
    s.rx.packets = u64::from(p.packets);
    s.rx.bytes = p.bytes;
    s.rx.keepalives = u64::from(p.keepalives);
}

/// Starts a new (all-zero) session at `now_ns`: accounted from `base`, its window reaching
/// `highest`, with `received` counters that the caller puts into the window.
#[inline(always)]
fn begin(s: &mut SessionState, base: u64, highest: u64, received: u64, now_ns: u64) {
    s.flags |= SESSION_STARTED;
    s.base = base;
    s.highest = highest;
    s.received = received;
    s.last_seen_ns = now_ns;
    s.newest = 0;
    s.checkpoints[0] = Checkpoint {
        highest,
        first_ns: now_ns,
        last_ns: now_ns,
    };
}

/// Sets the window bits of the 64-counter range from `first` whose arrivals are `bits`. The
/// range must lie within the window and its bits be clear.
#[inline(always)]
fn place_range(s: &mut SessionState, first: u64, bits: u64) {
    let word = ((first >> 6) as usize) & (WINDOW_WORDS - 1);
    let shift = first & 63;
    s.window[word] |= bits << shift;
    if shift != 0 {
        s.window[(word + 1) & (WINDOW_WORDS - 1)] |= bits >> (64 - shift);
    }
}

/// The highest counter held in the candidate.
#[inline(always)]
fn candidate_top(s: &SessionState) -> u64 {
    s.pending + u64::from(63 - s.pending_bits.leading_zeros())
}

/// Takes in the confirmed candidate's `arrived` counters, the window having moved to the
/// highest of them: they count as received, and the messages held with them (all but the
/// one that confirmed it, which the caller counts) join the session's receive counters.
#[inline(always)]
fn confirm(s: &mut SessionState, arrived: u32) {
    // The range lies within the new window (it ends at the top) and above the old highest,
    // so `advance` cleared its bits: the candidate's bits go in as they are.
    place_range(s, s.pending, s.pending_bits);
    s.received += u64::from(arrived);
    let rx = &mut s.rx;
    rx.packets += u64::from(s.pending_packets);
    rx.bytes += s.pending_bytes;
    rx.keepalives += u64::from(s.pending_keepalives);
    clear_candidate(s);
}

/// Counts the candidate's messages as suspect and drops it.
#[inline(always)]
fn reject(s: &mut SessionState) {
    s.rx.suspect += u64::from(s.pending_packets);
    clear_candidate(s);
}

#[inline(always)]
fn clear_candidate(s: &mut SessionState) {
    // Volatile, so that the compiler does not merge the adjacent fields into a memset call:
    // the 6.1 verifier allows no function call under a spin lock.
    // SAFETY: fields of a live value.
    unsafe {
        core::ptr::write_volatile(&mut s.pending, 0);
        core::ptr::write_volatile(&mut s.pending_bits, 0);
        core::ptr::write_volatile(&mut s.pending_bytes, 0);
        core::ptr::write_volatile(&mut s.pending_packets, 0);
        core::ptr::write_volatile(&mut s.pending_keepalives, 0);
    }
}

#[inline(always)]
fn set_bit(s: &mut SessionState, c: u64) {
    s.window[((c >> 6) as usize) & (WINDOW_WORDS - 1)] |= 1 << (c & 63);
}

/// Moves the highest counter to `to`, clearing the bits of the counters that enter the
/// window: they still hold what arrived [`WINDOW_BITS`] counters earlier.
///
/// Written for the verifier as much as for speed: a step within the current or next word
/// (nearly every packet) touches two words without a loop; a longer jump walks all words
/// with a fixed trip count whose index is the loop counter alone, so that the verifier's
/// states stay comparable and it does not explore every possible jump length.
#[inline(always)]
fn advance(s: &mut SessionState, to: u64) {
    let from = s.highest + 1;
    s.highest = to;
    let span = to - from;
    if span >= WINDOW_BITS - 1 {
        let mut i = 0;
        while i < WINDOW_WORDS {
            // Volatile, so that the compiler keeps the loop instead of calling memset: BPF
            // has no memset, and no function call is allowed under a spin lock.
            // SAFETY: an in-bounds element of a live array.
            unsafe { core::ptr::write_volatile(&mut s.window[i], 0) };
            i += 1;
        }
        return;
    }
    let first_block = from >> 6;
    let last_block = to >> 6;
    if last_block - first_block <= 1 {
        let first = (first_block as usize) & (WINDOW_WORDS - 1);
        if first_block == last_block {
            s.window[first] &= !bits(from & 63, to & 63);
        } else {
            let last = (last_block as usize) & (WINDOW_WORDS - 1);
            s.window[first] &= !bits(from & 63, 63);
            s.window[last] &= !bits(0, to & 63);
        }
        return;
    }
    // Ring word w holds blocks w, w + 32, ...: of the blocks first_block..=last_block (at
    // most 33, as span < 2047) it holds the first one at or after first_block with its
    // index, and possibly the one 32 blocks later.
    let mut w = 0;
    while w < WINDOW_WORDS {
        let k1 = first_block + ((w as u64).wrapping_sub(first_block) & (WINDOW_WORDS as u64 - 1));
        let mut mask = 0;
        if k1 <= last_block {
            mask = block_mask(k1, first_block, last_block, from, to);
            let k2 = k1 + WINDOW_WORDS as u64;
            if k2 <= last_block {
                mask |= block_mask(k2, first_block, last_block, from, to);
            }
        }
        // SAFETY: an in-bounds element of a live array; volatile as above.
        unsafe {
            let word = &mut s.window[w];
            core::ptr::write_volatile(word, core::ptr::read_volatile(word) & !mask);
        }
        w += 1;
    }
}

/// Bits `lo..=hi` of a word (`lo <= hi <= 63`).
#[inline(always)]
fn bits(lo: u64, hi: u64) -> u64 {
    (u64::MAX >> (63 - (hi - lo))) << lo
}

/// The bits of block `k` that lie within counters `from..=to`.
#[inline(always)]
fn block_mask(k: u64, first_block: u64, last_block: u64, from: u64, to: u64) -> u64 {
    let lo = if k == first_block { from & 63 } else { 0 };
    let hi = if k == last_block { to & 63 } else { 63 };
    bits(lo, hi)
}

/// Records the new highest counter in the checkpoint ring: into the newest checkpoint while
/// it is younger than `checkpoint_ns`, else into a new one that replaces the oldest.
#[inline(always)]
fn checkpoint(s: &mut SessionState, now_ns: u64, timeout_ns: u64, checkpoint_ns: u64) {
    let newest = (s.newest as usize) & (CHECKPOINTS - 1);
    if now_ns.saturating_sub(s.checkpoints[newest].first_ns) < checkpoint_ns {
        let cp = &mut s.checkpoints[newest];
        cp.highest = s.highest;
        cp.last_ns = now_ns;
        return;
    }
    // The oldest checkpoint is past the timeout by now (see Checkpoint): fold it into the
    // settle mark before it is overwritten.
    s.settled_below = s.settle_mark(now_ns, timeout_ns);
    let next = (newest + 1) & (CHECKPOINTS - 1);
    s.checkpoints[next] = Checkpoint {
        highest: s.highest,
        first_ns: now_ns,
        last_ns: now_ns,
    };
    s.newest = next as u32;
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexd_metrics_common::checkpoint_ns;

    const MS: u64 = 1_000_000;
    const TIMEOUT: u64 = 1_000 * MS;

    /// A session driven through the same calls the kernel program makes, with a clock.
    struct Session {
        s: SessionState,
        now: u64,
        fresh: bool,
        late: u64,
        duplicate: u64,
        in_order: u64,
        provisional: u64,
    }

    impl Session {
        fn new() -> Self {
            Self::with_fresh(false)
        }

        fn with_fresh(fresh: bool) -> Self {
            Self {
                s: SessionState::default(),
                // Not zero: the coarse clock of a running machine never is.
                now: 5_000 * MS,
                fresh,
                late: 0,
                duplicate: 0,
                in_order: 0,
                provisional: 0,
            }
        }

        /// Feeds 100-byte messages, every tenth a keepalive (as the counter tells).
        fn feed(&mut self, counters: impl IntoIterator<Item = u64>) {
            for c in counters {
                match receive(
                    &mut self.s,
                    c,
                    c % 10 == 0,
                    100,
                    self.fresh,
                    self.now,
                    TIMEOUT,
                    checkpoint_ns(TIMEOUT),
                ) {
                    Arrival::InOrder => self.in_order += 1,
                    Arrival::Late => self.late += 1,
                    Arrival::Duplicate => self.duplicate += 1,
                    Arrival::Provisional => self.provisional += 1,
                }
            }
        }

        fn wait(&mut self, ns: u64) {
            self.now += ns;
        }

        /// The lost count as the agent computes it now.
        fn lost(&self) -> u64 {
            self.s.lost(self.now, TIMEOUT)
        }
    }

    #[test]
    fn the_session_counts_what_it_receives_as_the_window_classifies_it() {
        let mut s = Session::new();
        s.feed([0, 2, 1, 1, 5, 3, 3, 4, 10]);
        s.feed(0..20);
        let rx = s.s.rx;
        assert_eq!(rx.packets, 9 + 20);
        assert_eq!(rx.bytes, 100 * (9 + 20));
        // 0 and 10 in each feed.
        assert_eq!(rx.keepalives, 2 + 2);
        assert_eq!((s.in_order, s.late, s.duplicate), (13, 7, 9));
        assert_eq!((rx.late, rx.duplicate), (7, 9));
    }

    #[test]
    fn in_order_stream_has_no_loss() {
        let mut s = Session::new();
        s.feed(0..10_000);
        s.wait(TIMEOUT);
        assert_eq!(
            (s.lost(), s.late, s.duplicate, s.in_order),
            (0, 0, 0, 10_000)
        );
        assert_eq!(s.s.received, 10_000);
    }

    #[test]
    fn reordering_within_the_window_is_late_not_lost() {
        let mut s = Session::new();
        // Pairs swapped, and one counter 2,000 behind.
        s.feed([0, 2, 1, 4, 3, 5]);
        s.feed(6..2_006);
        s.feed([2_006, 2_008, 2_007]);
        s.wait(TIMEOUT);
        s.feed([2_009]);
        s.wait(2 * TIMEOUT);
        assert_eq!((s.lost(), s.late, s.duplicate), (0, 3, 0));
        let mut far = Session::new();
        far.feed(1..=2_047);
        far.feed([0]);
        far.wait(TIMEOUT);
        assert_eq!((far.lost(), far.late), (0, 1));
    }

    #[test]
    fn hole_is_lost_only_after_the_timeout() {
        let mut s = Session::new();
        s.feed([0, 1, 3, 4]);
        assert_eq!(s.lost(), 0, "a fresh hole may still fill");
        s.wait(TIMEOUT - 1);
        assert_eq!(s.lost(), 0, "one nanosecond short of the timeout");
        s.wait(1);
        assert_eq!(s.lost(), 1);
        // The same figure from the kernel's side once a packet comes.
        s.feed([5]);
        assert_eq!(s.s.settled_below, 4);
        assert_eq!(s.lost(), 1);
    }

    #[test]
    fn hole_filled_before_the_timeout_is_never_lost() {
        let mut s = Session::new();
        s.feed([0, 1, 3]);
        s.wait(TIMEOUT - 1);
        s.feed([2]);
        s.wait(10 * TIMEOUT);
        s.feed([4]);
        s.wait(10 * TIMEOUT);
        assert_eq!((s.lost(), s.late), (0, 1));
    }

    #[test]
    fn hole_filled_after_the_timeout_stays_lost_and_is_late() {
        let mut s = Session::new();
        s.feed([0, 1, 3]);
        s.wait(TIMEOUT);
        assert_eq!(s.lost(), 1);
        s.feed([2]);
        assert_eq!((s.lost(), s.late), (1, 1), "lost never goes down");
        s.feed([2]);
        assert_eq!(s.duplicate, 1, "the second copy is a duplicate");
        s.wait(10 * TIMEOUT);
        s.feed([4]);
        assert_eq!(s.lost(), 1);
    }

    #[test]
    fn lost_is_settled_without_further_packets() {
        // Keepalives only: one message per 10 s, one of them lost, nothing after it.
        let mut s = Session::new();
        for c in [0u64, 1, 2, 4] {
            s.feed([c]);
            s.wait(10_000 * MS);
        }
        assert_eq!(s.lost(), 1);
    }

    #[test]
    fn duplicates_are_counted_and_change_nothing_else() {
        let mut s = Session::new();
        s.feed([0, 1, 1, 2, 0, 2, 2]);
        s.wait(TIMEOUT);
        assert_eq!((s.lost(), s.late, s.duplicate, s.s.received), (0, 0, 4, 3));
    }

    #[test]
    fn hole_beyond_the_window_is_lost_at_once() {
        let mut s = Session::new();
        s.feed([0]);
        // A jump this far is provisional until the sender's next messages confirm it.
        s.feed(4_997..=4_999);
        assert_eq!((s.provisional, s.lost(), s.s.highest), (3, 0, 0));
        s.feed([5_000]);
        // 1..=2_952 left the window (5_000 - 2_047 = 2_953 is its bottom): lost without
        // waiting; the rest of the gap waits for the timeout.
        assert_eq!(s.lost(), 2_952);
        s.wait(TIMEOUT);
        assert_eq!(s.lost(), 4_996);
        assert_eq!((s.s.rx.packets, s.s.received, s.s.rx.suspect), (5, 5, 0));
        // A counter from the far past is late, and stays lost.
        s.feed([17]);
        assert_eq!((s.lost(), s.late), (4_996, 1));
    }

    #[test]
    fn window_is_exactly_2048_counters() {
        let mut s = Session::new();
        s.feed([0]);
        s.feed(2_045..=2_048);
        // 0 is the bottom's neighbour: counter 1 is in the window, 0 just left it.
        assert_eq!(s.s.settle_mark(s.now, TIMEOUT), 1);
        assert_eq!(s.lost(), 0, "0 arrived; 1..2_045 are still open");
        s.feed([1]);
        assert_eq!(s.late, 1);
        s.feed([1]);
        assert_eq!(s.duplicate, 1, "1 is still in the window");
        s.feed([2_049, 1]);
        assert_eq!(
            (s.late, s.duplicate),
            (2, 1),
            "1 left: too old to tell, late"
        );
    }

    #[test]
    fn a_far_forgery_is_suspect_once_the_old_sequence_goes_on() {
        let mut s = Session::new();
        s.feed(0..10);
        // Three forged counters (fewer than confirm a jump), one of them replayed.
        s.feed([1_000_000, 1_000_002, 1_000_001, 1_000_002]);
        assert_eq!((s.provisional, s.s.highest, s.lost()), (4, 9, 0));
        // The real sender goes on; one of its messages is lost on the way.
        s.feed(10..20);
        s.feed(21..30);
        s.wait(TIMEOUT);
        assert_eq!(s.s.rx.suspect, 4);
        assert_eq!((s.lost(), s.late, s.duplicate), (1, 0, 0));
        assert_eq!((s.s.rx.packets, s.s.received), (29, 29));
        assert_eq!(s.s.pending_bits, 0);
    }

    #[test]
    fn a_real_message_that_overtook_many_is_received_when_the_stream_reaches_it() {
        let mut s = Session::new();
        s.feed(0..100);
        // 1,000 ahead: provisional, and the stream below it does not reject it, as no
        // reordering that far could be told from a forgery.
        s.feed([1_100]);
        s.feed(100..1_084);
        assert_eq!((s.provisional, s.s.highest), (1, 1_083));
        // Reaching its range takes it in; what lies below it is late from then on.
        s.feed(1_084..1_100);
        s.feed([1_101]);
        s.wait(TIMEOUT);
        assert_eq!((s.lost(), s.s.rx.suspect, s.duplicate), (0, 0, 0));
        assert_eq!((s.late, s.s.received, s.s.rx.packets), (16, 1_102, 1_102));
    }

    #[test]
    fn a_forgery_less_than_a_window_ahead_is_taken_as_an_early_message() {
        let mut s = Session::new();
        s.feed(0..100);
        s.feed([600]);
        s.feed(100..600);
        // The real 600 finds the forged one's place taken: a duplicate, and nothing lost.
        s.feed(600..700);
        s.wait(TIMEOUT);
        assert_eq!((s.lost(), s.duplicate, s.s.rx.suspect), (0, 1, 0));
        assert_eq!(s.late, 600 - 584);
    }

    #[test]
    fn a_forgery_far_beyond_the_window_moves_nothing() {
        // The counter of the report that started this: a million ahead.
        let mut s = Session::new();
        s.feed(0..100);
        s.feed([999_999 + 99]);
        s.feed(100..2_500);
        s.wait(TIMEOUT);
        assert_eq!((s.lost(), s.late, s.s.rx.suspect), (0, 0, 1));
    }

    #[test]
    fn late_and_duplicate_messages_neither_confirm_nor_reject() {
        let mut s = Session::new();
        s.feed([0, 1, 2, 4]);
        s.feed([10_000, 10_001]);
        s.feed([3, 2]);
        assert_eq!((s.late, s.duplicate, s.s.pending_packets), (1, 1, 2));
        // The burst was real: the sender goes on from it.
        s.feed([10_002, 10_003]);
        assert_eq!((s.s.highest, s.s.rx.suspect), (10_003, 0));
        s.wait(TIMEOUT);
        assert_eq!(s.lost(), 10_000 - 5);
    }

    #[test]
    fn a_confirmed_burst_keeps_the_candidates_reordering_and_holes() {
        let mut s = Session::new();
        s.feed(0..10);
        // After 5,000 lost: 5_011 and 5_013 lost too, the rest reordered.
        s.feed([5_012, 5_010, 5_014, 5_015]);
        assert_eq!(s.s.highest, 5_015);
        s.feed([5_016]);
        s.wait(TIMEOUT);
        assert_eq!(s.lost(), 5_000 + 2);
        assert_eq!((s.s.received, s.s.rx.packets), (15, 15));
    }

    #[test]
    fn probation_gives_a_window_after_four_counters_close_together() {
        let mut p = ProbationSession::default();
        // Made-up indexes send one counter, or counters far apart: never enough.
        assert!(!probation_hold(&mut p, 7, false, 100));
        assert!(!probation_hold(&mut p, 7_000, false, 100));
        assert!(!probation_hold(&mut p, 7_001, false, 100));
        assert!(
            !probation_hold(&mut p, 7_001, false, 100),
            "a replay is no new counter"
        );
        assert_eq!(
            (p.packets, p.bits.count_ones()),
            (3, 2),
            "7 was dropped on restart"
        );
        // A real session met midway: 7_002 lost, the rest reordered a little.
        assert!(!probation_hold(&mut p, 7_004, false, 100));
        assert!(probation_hold(&mut p, 7_003, true, 32));
        let mut s = Session::new();
        start_promoted(&mut s.s, &p, s.now);
        assert_eq!((s.s.base, s.s.highest, s.s.received), (7_000, 7_004, 4));
        assert_eq!(
            (s.s.rx.packets, s.s.rx.bytes, s.s.rx.keepalives),
            (5, 432, 1)
        );
        s.feed([7_002, 7_005]);
        assert_eq!((s.late, s.in_order), (1, 1));
        s.feed([7_006, 7_008]);
        s.wait(TIMEOUT);
        assert_eq!(s.lost(), 1, "7_007");
    }

    #[test]
    fn probation_near_counter_zero_and_the_top() {
        let mut p = ProbationSession::default();
        for c in [2u64, 0, 1, 3] {
            probation_hold(&mut p, c, false, 1);
        }
        assert_eq!(p.first, 0);
        let mut s = Session::new();
        start_promoted(&mut s.s, &p, s.now);
        assert_eq!((s.s.base, s.s.highest), (0, 3));
        let mut top = ProbationSession::default();
        let mut ready = false;
        for c in u64::MAX - 3..=u64::MAX {
            ready = probation_hold(&mut top, c, false, 1);
        }
        assert!(ready);
        let mut t = Session::new();
        start_promoted(&mut t.s, &top, t.now);
        assert_eq!((t.s.base, t.s.highest), (u64::MAX - 3, u64::MAX));
        t.wait(TIMEOUT);
        assert_eq!(t.lost(), 0);
    }

    #[test]
    fn bits_of_counters_entering_the_window_are_cleared() {
        // Counter c and c + 2048 share a bit. After the window moves, c + 2048 must not look
        // like a duplicate of c.
        let mut s = Session::new();
        s.feed(0..100);
        s.feed(2_100..2_104);
        s.feed(2_048..2_100);
        s.wait(TIMEOUT);
        assert_eq!(s.duplicate, 0);
        assert_eq!(s.late, 52);
        // 100..2_048 were never sent.
        assert_eq!(s.lost(), 1_948);
    }

    #[test]
    fn advancing_by_every_distance_clears_exactly_the_new_range() {
        // Compares the bitmap with a plain set of arrived counters for jumps of every size
        // around word and window boundaries.
        for jump in [
            1u64, 2, 63, 64, 65, 127, 128, 129, 1_000, 2_046, 2_047, 2_048, 2_049, 5_000,
        ] {
            for start in [0u64, 1, 62, 63, 64, 500] {
                let mut s = Session::new();
                let mut arrived = std::collections::BTreeSet::new();
                for c in (start..start + 3_000).step_by(3) {
                    s.feed([c]);
                    arrived.insert(c);
                }
                let top = start + 3_000 - 3 + jump;
                // Far jumps need the messages that confirm them.
                for c in top - 3..=top {
                    s.feed([c]);
                    arrived.insert(c);
                }
                for c in top.saturating_sub(WINDOW_BITS - 1)..=top {
                    assert_eq!(
                        s.s.has(c),
                        arrived.contains(&c),
                        "jump {jump} start {start} counter {c}"
                    );
                }
            }
        }
    }

    #[test]
    fn new_session_starts_a_new_window_without_loss() {
        // The agent sees one session start mid-stream: counting from its first counter.
        let mut old = Session::new();
        old.feed(1_000_000..1_000_010);
        old.wait(TIMEOUT);
        assert_eq!(old.lost(), 0);
        let mut rekeyed = Session::new();
        rekeyed.feed(0..10);
        rekeyed.wait(TIMEOUT);
        assert_eq!(rekeyed.lost(), 0);
    }

    #[test]
    fn fresh_session_counts_a_lost_first_message() {
        let mut s = Session::with_fresh(true);
        s.feed([1, 2, 3]);
        s.wait(TIMEOUT);
        assert_eq!(s.lost(), 1);
        let mut mid_stream = Session::new();
        mid_stream.feed([1, 2, 3]);
        mid_stream.wait(TIMEOUT);
        assert_eq!(mid_stream.lost(), 0);
    }

    #[test]
    fn counters_below_the_base_are_late_but_not_received() {
        let mut s = Session::new();
        s.feed([100, 101, 99, 102]);
        s.wait(TIMEOUT);
        assert_eq!((s.lost(), s.late, s.s.received), (0, 1, 3));
    }

    #[test]
    fn counters_near_the_top_of_u64() {
        let top = u64::MAX;
        let mut s = Session::new();
        s.feed([top - 5, top - 4, top - 2, top]);
        assert_eq!(s.lost(), 0);
        s.feed([top - 1]);
        s.wait(TIMEOUT);
        assert_eq!((s.lost(), s.late), (1, 1), "top - 3 is lost");
        s.feed([top, top - 4]);
        assert_eq!(s.duplicate, 2);

        // A jump across more than the window right up to u64::MAX.
        let mut j = Session::new();
        j.feed([0]);
        j.feed(top - 3..=top);
        assert_eq!(j.lost(), top - WINDOW_BITS + 1 - 1);
        j.wait(TIMEOUT);
        assert_eq!(j.lost(), top - 4);
    }

    #[test]
    fn timeouts_use_checkpoints_not_the_last_packet() {
        // Continuous traffic: a hole opened long ago settles even though packets keep
        // arriving every millisecond (the newest checkpoint is always young).
        let mut s = Session::new();
        s.feed([0, 2]);
        for c in 3..3_000u64 {
            s.wait(MS);
            s.feed([c]);
        }
        // About 3 s after the hole opened: settled by both sides.
        assert_eq!(s.lost(), 1);
        assert!(s.s.settled_below > 1, "kernel side settled it too");
        s.feed([1]);
        assert_eq!((s.lost(), s.late), (1, 1));
    }

    #[test]
    fn holes_are_never_settled_early() {
        // Whatever the packet timing, a hole that opened less than the timeout ago is not
        // lost: a hole opened at every step is checked right before its timeout.
        let mut s = Session::new();
        let mut c = 0u64;
        let mut opened = Vec::new();
        for step in 0..500u64 {
            s.wait((step * 7_919) % (400 * MS));
            c += 2;
            s.feed([c]);
            opened.push((c - 1, s.now));
            for &(hole, at) in &opened {
                let age = s.now - at;
                let settled = hole < s.s.settle_mark(s.now, TIMEOUT);
                assert!(
                    !settled || age >= TIMEOUT,
                    "hole {hole} settled at age {age}"
                );
            }
        }
    }

    #[test]
    fn lost_never_decreases_and_ends_at_the_true_loss() {
        // A pseudo-random stream: 5 % lost, some reordered by up to 40 counters, some
        // duplicated, some reordered beyond the timeout. The final lost count is exactly the
        // counters never sent plus those that arrived only after their hole settled.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut s = Session::new();
        let mut pending: Vec<(u64, u64)> = Vec::new(); // (deliver_at_step, counter)
        let mut never = 0u64;
        let mut too_late = std::collections::BTreeSet::new();
        let mut last_lost = 0;
        for step in 0..20_000u64 {
            let r = next() % 100;
            if r < 5 {
                never += 1;
            } else if r < 10 {
                pending.push((step + next() % 40, step));
            } else if r < 11 && step < 15_000 {
                // Delivered 2 s later: well after the timeout.
                pending.push((step + 2_000, step));
                too_late.insert(step);
            } else {
                s.feed([step]);
                if r < 13 {
                    s.feed([step]);
                }
            }
            pending.retain(|&(at, c)| {
                if at <= step {
                    s.feed([c]);
                    false
                } else {
                    true
                }
            });
            s.wait(MS);
            let lost = s.lost();
            assert!(lost >= last_lost, "lost went down at step {step}");
            last_lost = lost;
        }
        // The last counter was sent (and not held back) so every hole lies below it.
        s.feed([20_000]);
        for (_, c) in pending.drain(..) {
            s.feed([c]);
        }
        s.wait(TIMEOUT);
        // Counters that came back after their hole settled count as lost, as documented.
        assert_eq!(s.lost(), never + too_late.len() as u64);
        assert!(s.late >= too_late.len() as u64);
    }
}

/// The window against a reference model: a set of arrived counters, the highest, and
/// settling by timeout and window, over random streams with loss, reordering, duplicates,
/// burst losses and forged counters near and far ahead, at any place in the counter space.
#[cfg(test)]
mod model {
    use std::collections::BTreeSet;

    use plexd_metrics_common::{checkpoint_ns, CONFIRM_COUNTERS, PROVISIONAL_JUMP};
    use proptest::prelude::*;

    use super::*;

    const MS: u64 = 1_000_000;
    const TIMEOUT: u64 = 1_000 * MS;
    /// Events per stream: at a millisecond each, the stream stays shorter than the timeout,
    /// so only the window settles holes before the end (the model's settle rule).
    const EVENTS: usize = 300;

    /// What happens next on the path.
    #[derive(Clone, Debug)]
    enum Event {
        /// The sender's next message arrives.
        Deliver,
        /// The sender's next message is dropped on the way.
        Drop,
        /// The sender's next message arrives twice.
        Twice,
        /// The sender's next message arrives after this many later events.
        Delay(usize),
        /// The sender's next `n` messages are all dropped (longer than the jump limit: the
        /// stream that follows has to be confirmed).
        Burst(u64),
        /// A forger's counters this far above the highest (more than the jump limit), with
        /// these small offsets: fewer distinct ones than confirm a candidate.
        ForgeFar(u64, Vec<u64>),
        /// A forger's counter this far above the highest (within the jump limit).
        ForgeNear(u64),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            40 => Just(Event::Deliver),
            6 => Just(Event::Drop),
            3 => Just(Event::Twice),
            5 => (1usize..8).prop_map(Event::Delay),
            2 => prop_oneof![
                (PROVISIONAL_JUMP..3 * WINDOW_BITS),
                (PROVISIONAL_JUMP..1u64 << 40),
            ]
            .prop_map(Event::Burst),
            3 => (
                prop_oneof![
                    PROVISIONAL_JUMP + 1..PROVISIONAL_JUMP + 100,
                    PROVISIONAL_JUMP + 1..4 * WINDOW_BITS,
                    PROVISIONAL_JUMP + 1..u64::MAX,
                ],
                proptest::collection::vec(0u64..4, 1..CONFIRM_COUNTERS as usize),
            )
                .prop_map(|(d, offsets)| Event::ForgeFar(d, offsets)),
            1 => (1..=PROVISIONAL_JUMP).prop_map(Event::ForgeNear),
        ]
    }

    fn start() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            any::<u32>().prop_map(u64::from),
            // Near the top of the counter space, with room for the stream's bursts.
            (0u64..1_000).prop_map(|d| u64::MAX - (EVENTS as u64 + 1) * (1 << 40) - d),
        ]
    }

    /// The reference: which counters arrived in time to count, classified by the rules the
    /// documentation states, with forged far counters kept out of it.
    #[derive(Default)]
    struct Model {
        started: bool,
        base: u64,
        highest: u64,
        /// Every counter that arrived (for duplicates).
        seen: BTreeSet<u64>,
        /// Counters at or above the base that arrived before they were settled.
        received: BTreeSet<u64>,
        late: u64,
        duplicate: u64,
        packets: u64,
        suspect: u64,
        /// Forged counters less than a window ahead, held until the stream reaches
        /// `anchor` (they might have been real messages that overtook others).
        held: Vec<u64>,
        anchor: u64,
    }

    impl Model {
        fn arrive(&mut self, c: u64) {
            if !self.held.is_empty() && c > self.highest && c >= self.anchor {
                // The stream reached them: taken as early messages.
                self.packets += self.held.len() as u64;
                for f in std::mem::take(&mut self.held) {
                    self.highest = self.highest.max(f);
                    self.seen.insert(f);
                    self.received.insert(f);
                }
            }
            self.packets += 1;
            if !self.started {
                self.started = true;
                self.base = c;
                self.highest = c;
                self.seen.insert(c);
                self.received.insert(c);
                return;
            }
            if c > self.highest {
                self.highest = c;
            } else if self.highest - c >= WINDOW_BITS {
                // Out of the window: too old to tell, and settled already.
                self.late += 1;
                return;
            } else if self.seen.contains(&c) {
                self.duplicate += 1;
                return;
            } else {
                self.late += 1;
            }
            self.seen.insert(c);
            if c >= self.base {
                self.received.insert(c);
            }
        }

        /// Lost once every counter below the highest is settled.
        fn lost(&self) -> u64 {
            let below = self.received.range(..self.highest).count() as u64;
            (self.highest - self.base) - below
        }
    }

    /// Runs the stream through the window and the model side by side.
    fn run(first: u64, events: &[Event]) -> Result<(), TestCaseError> {
        let mut s = SessionState::default();
        let mut m = Model::default();
        let mut now = 5_000 * MS;
        let mut next = first;
        let mut delayed: Vec<(usize, u64)> = Vec::new();
        let mut last_lost = 0;
        // Events forced by the stream so far: after a burst, the messages that confirm it;
        // after a forgery, a real message before anything else.
        let mut forced_delivers = 0u32;
        let feed = |s: &mut SessionState, c: u64, now: u64| {
            receive(
                s,
                c,
                false,
                100,
                false,
                now,
                TIMEOUT,
                checkpoint_ns(TIMEOUT),
            )
        };
        // The session starts with a real message.
        feed(&mut s, next, now);
        m.arrive(next);
        next += 1;
        for (i, e) in events.iter().enumerate() {
            now += MS;
            let e = if !m.held.is_empty() {
                // Held forgeries stay until the stream reaches them.
                &Event::Deliver
            } else if forced_delivers > 0 {
                forced_delivers -= 1;
                &Event::Deliver
            } else {
                e
            };
            match e {
                Event::Deliver => {
                    feed(&mut s, next, now);
                    m.arrive(next);
                    next += 1;
                }
                Event::Drop => next += 1,
                Event::Twice => {
                    for _ in 0..2 {
                        feed(&mut s, next, now);
                        m.arrive(next);
                    }
                    next += 1;
                }
                Event::Delay(k) => {
                    delayed.push((i + k, next));
                    next += 1;
                }
                Event::Burst(n) => {
                    // Stragglers from before the burst arrive first: a real message of the
                    // old sequence after the new one has begun is what a forgery looks like.
                    for (_, c) in delayed.drain(..) {
                        feed(&mut s, c, now);
                        m.arrive(c);
                    }
                    next += n;
                    forced_delivers = CONFIRM_COUNTERS;
                }
                Event::ForgeFar(d, offsets) => {
                    let Some(at) = m.highest.checked_add(*d) else {
                        continue;
                    };
                    let anchor = at.saturating_add(offsets[0]) - 16;
                    let far = anchor - m.highest > WINDOW_BITS;
                    for o in offsets {
                        let c = at.saturating_add(*o);
                        let arrival = feed(&mut s, c, now);
                        prop_assert_eq!(arrival, Arrival::Provisional, "forged {}", c);
                        if far {
                            m.suspect += 1;
                        } else {
                            m.held.push(c);
                        }
                    }
                    m.anchor = anchor;
                    // The sender's next message, past any counter a forger took ahead of it
                    // (the sender's own messages with those counters are lost on the way).
                    next = next.max(m.highest + 1);
                    forced_delivers = 1;
                }
                Event::ForgeNear(d) => {
                    let c = m.highest + d;
                    feed(&mut s, c, now);
                    m.arrive(c);
                }
            }
            let due: Vec<u64> = delayed
                .iter()
                .filter(|(at, _)| *at <= i)
                .map(|&(_, c)| c)
                .collect();
            delayed.retain(|(at, _)| *at > i);
            for c in due {
                feed(&mut s, c, now);
                m.arrive(c);
            }
            let lost = s.lost(now, TIMEOUT);
            prop_assert!(lost >= last_lost, "lost went down at event {}", i);
            last_lost = lost;
        }
        for (_, c) in delayed.drain(..) {
            feed(&mut s, c, now);
            m.arrive(c);
        }
        // Real messages to end with: the first settles a forged candidate (the old sequence
        // goes on), and more complete a burst's confirmation.
        for _ in 0..3 * WINDOW_BITS {
            feed(&mut s, next, now);
            m.arrive(next);
            next += 1;
            if s.pending_bits == 0 {
                break;
            }
        }
        prop_assert_eq!(s.pending_bits, 0, "the candidate is settled");
        now += TIMEOUT;
        prop_assert_eq!(s.pending_packets, 0);
        prop_assert_eq!(s.rx.suspect, m.suspect, "suspect");
        prop_assert_eq!(s.highest, m.highest, "highest");
        prop_assert_eq!(s.lost(now, TIMEOUT), m.lost(), "lost");
        prop_assert_eq!(s.received, m.received.len() as u64, "received");
        prop_assert_eq!(
            (s.rx.packets, s.rx.late, s.rx.duplicate),
            (m.packets, m.late, m.duplicate),
            "packets, late, duplicate"
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn the_window_agrees_with_the_model(
            first in start(),
            events in proptest::collection::vec(event(), 1..EVENTS),
        ) {
            run(first, &events)?;
        }
    }
}
