//! The rules of the product, apart from the system calls that feed them: settling loss
//! and folding sessions into endpoints ([`sessions`]), joining endpoints to peers across
//! roaming ([`join`]), counters turned into intervals ([`cumulative`]), the ICMP echo codec
//! ([`icmp`]), routing tables ([`routes`]), the latency summaries ([`latency`]), the host's
//! CPU, disk and network figures ([`host`]) and what application endpoints answer
//! ([`app_metrics`]).
//!
//! Nothing here opens a file or a socket, spawns a task or reads a clock: the adapters in
//! [`crate::source`] do that and hand plain values across, so that every rule is tested on
//! any machine, without privileges.

pub mod app_metrics;
pub mod counters;
pub mod cumulative;
pub mod device;
pub mod host;
pub mod icmp;
pub mod join;
pub mod latency;
pub mod routes;
pub mod sessions;
