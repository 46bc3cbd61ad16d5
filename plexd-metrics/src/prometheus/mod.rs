//! The Prometheus side of the agent: one mapping of points to metric families
//! ([`series`], named in [`names`]), served on `/metrics` ([`exposition`]) and written to a
//! remote-write receiver ([`remote_write`]).

pub mod exposition;
pub mod names;
pub mod remote_write;
pub mod series;
