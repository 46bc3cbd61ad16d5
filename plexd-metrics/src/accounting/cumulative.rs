//! Counters that only grow, and the intervals between two readings of them.
//!
//! The kernel programs and WireGuard count from the moment they start; the plexd wire wants
//! what happened in each interval. [`Cumulative`] names that idea once: a struct of
//! counters says, field by field and by name, how it is subtracted and added, so that two
//! counters cannot trade places the way positional arrays let them.

use plexd_metrics_common::SessionRx;

use super::counters::EndpointCounters;

/// A set of counters that only grow while their source lives.
pub trait Cumulative: Copy + Default + PartialEq {
    /// Whether any counter is below its value in `before`: the source started again (a new
    /// session under the same index, a map entry created anew), so nothing can be
    /// subtracted.
    fn shrank_since(&self, before: &Self) -> bool;

    /// Every counter less its value in `before`; only called when none shrank.
    fn minus(&self, before: &Self) -> Self;

    /// Adds `other` to every counter, stopping at the largest value rather than wrapping.
    fn accumulate(&mut self, other: &Self);

    /// What was counted since `before`: the difference, or everything when the source
    /// started again in between.
    fn since(&self, before: &Self) -> Self {
        if self.shrank_since(before) {
            *self
        } else {
            self.minus(before)
        }
    }
}

impl Cumulative for u64 {
    fn shrank_since(&self, before: &Self) -> bool {
        self < before
    }

    fn minus(&self, before: &Self) -> Self {
        self - before
    }

    fn accumulate(&mut self, other: &Self) {
        *self = self.saturating_add(*other);
    }
}

/// Implements [`Cumulative`] for a struct by naming each of its fields. The struct
/// literal in `minus` lists every field, so a counter added to the struct and not here
/// does not compile.
macro_rules! cumulative_fields {
    ($ty:ty { $($field:ident),+ $(,)? }) => {
        impl Cumulative for $ty {
            fn shrank_since(&self, before: &Self) -> bool {
                false $(|| self.$field.shrank_since(&before.$field))+
            }

            fn minus(&self, before: &Self) -> Self {
                Self { $($field: self.$field.minus(&before.$field)),+ }
            }

            fn accumulate(&mut self, other: &Self) {
                $(self.$field.accumulate(&other.$field);)+
            }
        }
    };
}

pub(crate) use cumulative_fields;

cumulative_fields!(EndpointCounters {
    rx_packets,
    rx_bytes,
    tx_packets,
    tx_bytes,
    rx_keepalives,
    tx_keepalives,
    initiations_sent,
    initiations_received,
    responses_sent,
    responses_received,
    cookie_replies,
    malformed,
    lost,
    late,
    duplicate,
    suspect,
});

cumulative_fields!(SessionRx {
    packets,
    bytes,
    keepalives,
    late,
    duplicate,
    suspect,
});

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn counters(values: [u64; 4]) -> EndpointCounters {
        EndpointCounters {
            rx_packets: values[0],
            tx_bytes: values[1],
            lost: values[2],
            duplicate: values[3],
            ..EndpointCounters::default()
        }
    }

    #[test]
    fn each_counter_is_subtracted_from_itself() {
        let before = counters([10, 1_000, 2, 0]);
        let now = counters([15, 1_600, 3, 1]);
        assert_eq!(now.since(&before), counters([5, 600, 1, 1]));
    }

    #[test]
    fn one_counter_going_back_means_everything_is_new() {
        let before = counters([10, 1_000, 2, 0]);
        let now = counters([15, 900, 3, 1]);
        assert_eq!(now.since(&before), now);
    }

    #[test]
    fn adding_stops_at_the_largest_value() {
        let mut sum = counters([u64::MAX - 1, 1, 0, 0]);
        sum.accumulate(&counters([5, 2, 0, 0]));
        assert_eq!(sum, counters([u64::MAX, 3, 0, 0]));
    }

    proptest! {
        #[test]
        fn growth_added_to_the_start_gives_the_end(
            start in proptest::array::uniform4(0u64..1 << 40),
            growth in proptest::array::uniform4(0u64..1 << 40),
        ) {
            let before = counters(start);
            let mut now = before;
            now.accumulate(&counters(growth));
            prop_assert_eq!(now.since(&before), counters(growth));
            let mut back = before;
            back.accumulate(&now.since(&before));
            prop_assert_eq!(back, now);
        }
    }
}
