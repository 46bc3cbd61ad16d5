//! The pure parts of the kernel programs.
//!
//! Everything here compiles for `bpfel-unknown-none` and for the host, so that
//! `cargo xtask test` can unit-test it without loading anything into a kernel. The entry
//! points in `main.rs` stay thin wrappers around these functions: they supply packet bytes
//! through [`Packet`] and map values through plain references.
#![cfg_attr(not(test), no_std)]

pub mod parse;
pub mod window;

use plexd_metrics_common::PacketCounters;

/// Accounts one packet of `len` bytes.
///
/// Wrapping, because a counter that panics cannot exist in BPF; at 2^64 bytes wrap-around is
/// a theoretical concern that readers of differences already handle.
#[inline(always)]
pub fn record(counters: &mut PacketCounters, len: u32) {
    counters.packets = counters.packets.wrapping_add(1);
    counters.bytes = counters.bytes.wrapping_add(u64::from(len));
}

/// Whether two names are equal, usable in constant assertions (`str` equality is not `const`).
pub const fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_packets_and_bytes() {
        let mut c = PacketCounters::default();
        record(&mut c, 142);
        record(&mut c, 60);
        assert_eq!(
            c,
            PacketCounters {
                packets: 2,
                bytes: 202
            }
        );
    }

    #[test]
    fn record_wraps_instead_of_overflowing() {
        let mut c = PacketCounters {
            packets: u64::MAX,
            bytes: u64::MAX - 1,
        };
        record(&mut c, 3);
        assert_eq!(
            c,
            PacketCounters {
                packets: 0,
                bytes: 1
            }
        );
    }

    #[test]
    fn same_name_compares_whole_strings() {
        assert!(same_name("PACKET_COUNTERS", "PACKET_COUNTERS"));
        assert!(!same_name("PACKET_COUNTERS", "PACKET_COUNTER"));
        assert!(!same_name("plexd_tc_ingress", "plexd_tc_egress_"));
        assert!(same_name("", ""));
    }
}
