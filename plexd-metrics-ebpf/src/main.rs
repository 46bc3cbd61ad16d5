//! Kernel programs of plexd-metrics.
//!
//! Two TC classifiers count every packet and byte that crosses an underlay interface, one per
//! direction. They only observe: each returns `TC_ACT_PIPE`, so the packet goes on to whatever
//! else is attached (other programs, tc filters) exactly as if they were not there.
//!
//! Names and layouts come from `plexd-metrics-common`, the one place that defines the contract
//! with the agent; the assertions below make a rename there fail this build instead of failing
//! at load time on a node.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use plexd_metrics_common::{
    Direction, PacketCounters, DIRECTIONS, MAP_PACKET_COUNTERS, PROG_EGRESS, PROG_INGRESS,
};
use plexd_metrics_ebpf::{record, same_name};

/// Packets and bytes per [`Direction`]. Per-CPU, so that concurrent packets on different CPUs
/// never contend and a plain add is enough; the agent sums the CPUs when it reads.
#[map]
static PACKET_COUNTERS: PerCpuArray<PacketCounters> = PerCpuArray::with_max_entries(DIRECTIONS, 0);

// The macros take the symbol's own name as the map and program name, so the contract's
// constants are checked against the symbols here.
const _: () = assert!(same_name(MAP_PACKET_COUNTERS, "PACKET_COUNTERS"));
const _: () = assert!(same_name(PROG_INGRESS, "plexd_tc_ingress"));
const _: () = assert!(same_name(PROG_EGRESS, "plexd_tc_egress"));

/// Counts a packet arriving on the interface.
#[classifier]
pub fn plexd_tc_ingress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Ingress);
    TC_ACT_PIPE
}

/// Counts a packet leaving through the interface.
#[classifier]
pub fn plexd_tc_egress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Egress);
    TC_ACT_PIPE
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

// Nothing the programs run can panic (no indexing, no unwrap, no overflow checks in these
// profiles), and the verifier would reject a program that could reach this loop.
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
