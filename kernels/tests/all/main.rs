//! Integration tests of `tensor-wasm-kernels`, in one binary (`tests/all`)
//! with a module per topic:
//!
//! - `reference`: an independent, naive f64 implementation of every op;
//! - `ops`: property tests of the CPU backend against the reference;
//! - `dtype_rules`: the dtype rules of `docs/KERNELS.md` as explicit examples;
//! - `errors`: every error path, its variant and ABI code; hostile inputs
//!   never panic; operands are never modified;
//! - `parity` (feature `cuda`): the CUDA backend against the CPU backend;
//! - `devices` (feature `cuda`): discovery on a real GPU machine.
//!
//! Shared helpers (host tensors, random inputs, comparisons) are in `util`.

#[cfg(feature = "cuda")]
mod devices;
mod dtype_rules;
mod errors;
mod ops;
#[cfg(feature = "cuda")]
mod parity;
mod reference;
mod util;
