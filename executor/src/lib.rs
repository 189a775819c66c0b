//! The executor: where tenants' WebAssembly functions run, one process per
//! GPU, MIG slice or CPU.
//!
//! The path of an invocation, by module:
//! 1. [`http`] receives `POST /functions/{id}/invoke` with the internal
//!    token and the tenant header, and [`body`] decodes its inputs (JSON
//!    tensors, safetensors, or raw bytes) onto the tenant's backend.
//! 2. [`registry`] resolves the tenant's function once, admits the call
//!    and takes a slot of the function's pool ([`state`]), waiting in a
//!    bounded queue if all are busy; then one blocking hop decodes the
//!    inputs, runs the instance and encodes the outputs.
//! 3. [`instance`] runs the guest's `handle` in wasmtime ([`engine`]) under
//!    the invocation's deadline; the guest calls the `tensor` imports of
//!    [`host`], which check every pointer and dispatch to the kernels of
//!    `tensor-wasm-kernels`, keeping results in the instance's [`tensors`]
//!    table.
//! 4. The instance goes back to the pool with its state, and [`body`]
//!    encodes the named outputs (or the raw bytes) for the response.
//!
//! [`state`] draws who owns which part of the executor's state (tenants,
//! functions, pools, jobs, the files under the state directory) and the
//! invariants between their counts.
//!
//! Registration ([`wasm`]) refuses what cannot be bounded or snapshotted
//! and rewrites the module to export its mutable globals. [`error`] maps
//! every failure to its public code in one place. The only `unsafe` is in
//! `sys` (loading compiled modules this executor wrote).

#![deny(unsafe_code)]

pub mod assets;
pub mod body;
pub mod config;
pub mod durable;
pub mod engine;
pub mod error;
pub mod fence;
pub mod host;
pub mod http;
pub mod inbound;
pub mod instance;
pub mod jobs;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod moves;
pub mod outbound;
pub mod peer;
pub mod pipe;
pub mod registry;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod stream;
mod sync;
mod sys;
pub mod tensors;
pub mod tracking;
pub mod wasm;
