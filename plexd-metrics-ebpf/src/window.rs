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

use plexd_metrics_common::{
    Checkpoint, SessionState, CHECKPOINTS, SESSION_STARTED, WINDOW_BITS, WINDOW_WORDS,
};

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
    let rx = &mut s.rx;
    rx.packets += 1;
    rx.bytes += bytes;
    if keepalive {
        rx.keepalives += 1;
    }
    match arrival {
        Arrival::Late => rx.late += 1,
        Arrival::Duplicate => rx.duplicate += 1,
        Arrival::InOrder => {}
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
        s.flags |= SESSION_STARTED;
        s.base = if fresh { 0 } else { counter };
        s.highest = counter;
        // The window is still all zeros: sessions are created zeroed and start only here.
        set_bit(s, counter);
        s.received = 1;
        s.last_seen_ns = now_ns;
        s.newest = 0;
        s.checkpoints[0] = Checkpoint {
            highest: counter,
            first_ns: now_ns,
            last_ns: now_ns,
        };
        return Arrival::InOrder;
    }
    s.last_seen_ns = now_ns;
    if counter > s.highest {
        advance(s, counter);
        set_bit(s, counter);
        s.received += 1;
        checkpoint(s, now_ns, timeout_ns, checkpoint_ns);
        return Arrival::InOrder;
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
        s.feed([5_000]);
        // 1..=2_952 left the window (5_000 - 2_047 = 2_953 is its bottom): lost without
        // waiting; the rest of the gap waits for the timeout.
        assert_eq!(s.lost(), 2_952);
        s.wait(TIMEOUT);
        assert_eq!(s.lost(), 4_999);
        // A counter from the far past is late, and stays lost.
        s.feed([17]);
        assert_eq!((s.lost(), s.late), (4_999, 1));
    }

    #[test]
    fn window_is_exactly_2048_counters() {
        let mut s = Session::new();
        s.feed([0]);
        s.feed([2_048]);
        // 0 is the bottom's neighbour: counter 1 is in the window, 0 just left it.
        assert_eq!(s.s.settle_mark(s.now, TIMEOUT), 1);
        assert_eq!(s.lost(), 0, "0 arrived; 1..2_047 are still open");
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
    fn bits_of_counters_entering_the_window_are_cleared() {
        // Counter c and c + 2048 share a bit. After the window moves, c + 2048 must not look
        // like a duplicate of c.
        let mut s = Session::new();
        s.feed(0..100);
        s.feed([2_100]);
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
                s.feed([top]);
                arrived.insert(top);
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
        j.feed([0, top]);
        assert_eq!(j.lost(), top - WINDOW_BITS + 1 - 1);
        j.wait(TIMEOUT);
        assert_eq!(j.lost(), top - 1);
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
