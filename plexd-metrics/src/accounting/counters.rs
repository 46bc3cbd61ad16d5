//! What the kernel programs count per WireGuard endpoint, as userspace sees it.
//!
//! The eBPF source hands these to the tunnel join (which pairs them with the WireGuard
//! device state). Counts are cumulative since the programs were attached; the join turns
//! them into per-interval figures.

use std::collections::HashMap;
use std::net::SocketAddr;

/// The hasher of the maps keyed by what the network chooses (endpoints, session indexes):
/// seeded at random per process, so that no sender can aim for collisions, and cheaper
/// than the standard library's SipHash on these short keys, of which a collect at 10,000
/// peers hashes some 60,000.
pub type NetworkKeyHasher = foldhash::quality::RandomState;

/// Cumulative WireGuard counters for one remote endpoint (address and UDP port).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    /// Transport messages received from the endpoint (keepalives included).
    pub rx_packets: u64,
    /// Bytes of those messages, as they crossed the underlay (outer headers included).
    pub rx_bytes: u64,
    /// Transport messages sent to the endpoint (keepalives included).
    pub tx_packets: u64,
    /// Bytes of those messages, as they crossed the underlay.
    pub tx_bytes: u64,
    /// Keepalives (transport messages with an empty payload) received.
    pub rx_keepalives: u64,
    /// Keepalives sent.
    pub tx_keepalives: u64,
    /// Handshake initiations sent to the endpoint.
    pub initiations_sent: u64,
    /// Handshake initiations received from the endpoint.
    pub initiations_received: u64,
    /// Handshake responses sent to the endpoint.
    pub responses_sent: u64,
    /// Handshake responses received from the endpoint.
    pub responses_received: u64,
    /// Cookie replies, in either direction.
    pub cookie_replies: u64,
    /// Packets on a WireGuard port that are not a valid WireGuard message.
    pub malformed: u64,
    /// Transport messages from the endpoint that never arrived, settled.
    pub lost: u64,
    /// Transport messages from the endpoint that filled a hole (arrived after a later one).
    pub late: u64,
    /// Transport messages from the endpoint that arrived twice.
    pub duplicate: u64,
    /// Transport messages WireGuard would reject: counters far ahead of their session that
    /// the messages after them showed forged (see docs/kernel-accounting.md).
    pub suspect: u64,
}

/// A snapshot of the kernel programs' per-endpoint counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Counters per remote endpoint.
    pub endpoints: HashMap<SocketAddr, EndpointCounters, NetworkKeyHasher>,
    /// Endpoints this snapshot reports for the last time: the source forgets them, and
    /// counts them from zero should they send again. A reader that keeps per-endpoint
    /// state drops it for these.
    pub removed: Vec<SocketAddr>,
    /// Endpoints or sessions the maps had no room for since attach (never silent).
    pub map_overflows: u64,
}
