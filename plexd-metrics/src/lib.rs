//! plexd-metrics: a node metrics agent for WireGuard meshes.
//!
//! The pipeline is the plexd spec's: sources (behind traits) feed [`collector`]s, whose
//! points the [`manager::Manager`] buffers and hands to a [`reporter::MetricReporter`].
//! [`agent`] wires these together from the [`config::Settings`] a validated
//! [`config::Config`] gives.

#![warn(missing_docs)]

pub mod accounting;
pub mod agent;
pub mod api;
pub mod collector;
pub mod config;
pub mod health;
pub mod http_server;
pub mod logging;
pub mod manager;
pub mod memory;
pub mod prometheus;
pub mod queue;
pub mod reporter;
pub mod secret;
pub mod small_file;
pub mod source;
