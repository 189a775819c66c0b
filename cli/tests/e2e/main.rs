//! End to end with real processes: `tensor-wasm executor` and `tensor-wasm
//! proxy` started from the binary this test build made, on loopback ports,
//! stopped by the tests.

mod assets;
mod client;
mod durable;
mod executor;
mod harness;
mod isolation;
mod operations;
mod proxy;
mod routes;
mod shared_placement;
mod streams;
mod up;
mod up_proxies;
mod upgrade;
