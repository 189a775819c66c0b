//! Integration tests of the executor: a real executor serving HTTP on
//! loopback, guests written in WAT and compiled at test time, and the
//! example functions of `examples/` built by `scripts/build-examples`.

mod abi;
mod assets;
mod bodies;
mod examples;
mod harness;
mod jobs;
mod memory;
mod migration;
mod registration;
mod snapshots;
mod streams;
mod tenancy;
