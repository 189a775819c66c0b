//! The proxy: the one public endpoint of a TensorWasm fleet.
//!
//! Layout, in the order a request meets it:
//! - [`conn`]: caps on client connections, header and idle timeouts.
//! - [`service`]: the pingora `ProxyHttp` of the public listener.
//! - [`auth`]: bearer tokens to tenants; [`ratelimit`]: per-tenant limits.
//! - [`fleet`]: executors, their health, and each tenant's gate (held while
//!   it moves); [`placement`]: the persisted tenant → executor table.
//! - [`upstream`]: the proxy's own calls to executors.
//! - [`migrate`]: live migration and the admin operations built on it.
//! - [`admin`]: the admin API; [`audit`]: the audit log; [`metrics`];
//!   [`routes`]: bounded names of routes.
//! - [`server`]: assembling and running the process, signals, upkeep.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod conn;
pub mod fleet;
pub mod metrics;
pub mod migrate;
pub mod placement;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod service;
pub mod upstream;

pub use server::{PlacementSource, ProxyConfig, TokenSource, run};
