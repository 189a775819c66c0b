//! The proxy: the one public endpoint of a TensorWasm fleet.
//!
//! It decides who a request belongs to ([`auth`]), whether it may pass
//! ([`ratelimit`]), and which executor owns that tenant ([`placement`]).
//! These are the proxy's decisions, kept free of any server so they are
//! tested on their own; the pingora service that applies them to traffic,
//! the audit log, health checks and the migration orchestrator build on
//! them.

#![forbid(unsafe_code)]

pub mod auth;
pub mod placement;
pub mod ratelimit;
