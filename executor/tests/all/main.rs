//! Integration tests of the executor: a real executor serving HTTP on
//! loopback, guests written in WAT and compiled at test time.

mod abi;
mod bodies;
mod harness;
mod jobs;
mod registration;
mod snapshots;
mod tenancy;
