//! The seam between the eBPF source, which reads and settles the maps, and the tunnel
//! reader, which joins what they count with the WireGuard device state; a trait, so that the
//! join is tested with a fake.

use std::net::SocketAddr;

use crate::accounting::counters::CounterSnapshot;
use crate::collector::BoxError;

/// Reads the per-endpoint counters, settling lost packets first: the kernel side's face
/// toward the tunnel reader, so that the join is tested with a fake.
pub trait EndpointCounterSource: Send + Sync {
    /// Settles holes that can no longer be filled, then returns every endpoint's counters.
    fn read_endpoints(&self) -> Result<CounterSnapshot, BoxError>;

    /// Tells the kernel programs which UDP ports WireGuard listens on (all devices).
    fn set_listen_ports(&self, ports: &[u16]) -> Result<(), BoxError>;

    /// Creates counters for endpoints known from the WireGuard device state before their
    /// traffic does, so that a burst of new peers never waits for the kernel to find
    /// memory. Optional: endpoints get counters with their first message anyway.
    fn track_endpoints(&self, endpoints: &[SocketAddr]) -> Result<(), BoxError> {
        let _ = endpoints;
        Ok(())
    }
}
