//! The contract between the kernel programs and the agent.
//!
//! Every BPF map the agent reads is named and laid out here, and only here. Layouts are
//! `#[repr(C)]` with explicit padding and a size assertion each, because the kernel side and
//! userspace are compiled by different compilers for different targets.
#![no_std]

/// Name of the TC program attached to the ingress hook of an underlay interface.
pub const PROG_INGRESS: &str = "plexd_tc_ingress";
/// Name of the TC program attached to the egress hook of an underlay interface.
pub const PROG_EGRESS: &str = "plexd_tc_egress";

/// Name of the per-CPU array that holds [`PacketCounters`], indexed by [`Direction`].
pub const MAP_PACKET_COUNTERS: &str = "PACKET_COUNTERS";

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

#[cfg(feature = "user")]
// SAFETY: PacketCounters is repr(C), has no padding and every bit pattern is valid.
unsafe impl aya::Pod for PacketCounters {}
