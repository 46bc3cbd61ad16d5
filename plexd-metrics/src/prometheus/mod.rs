//! The Prometheus side of the agent: one mapping of points to metric families
//! ([`series`], named in [`names`]), served on `/metrics` ([`exposition`]).

pub mod exposition;
pub mod names;
pub mod series;
