//! The executor's only `unsafe`: loading compiled modules from its cache.

#![allow(unsafe_code)]

use wasmtime::{Engine, Module};

/// Bytes that this executor serialized with `Module::serialize` and
/// authenticated since (see `engine::ModuleCache`).
#[derive(Debug)]
pub struct Authenticated<'a>(pub(crate) &'a [u8]);

/// Loads a compiled module.
pub fn deserialize_module(engine: &Engine, bytes: Authenticated<'_>) -> wasmtime::Result<Module> {
    // SAFETY: `Module::deserialize` is unsafe because it maps the bytes as
    // executable code without validating them. `Authenticated` can only be
    // built by the module cache after checking an HMAC, under a key that
    // never leaves this machine's state directory, over bytes this executor
    // wrote with `Module::serialize`; so these are our own compiler's output,
    // and wasmtime additionally refuses bytes from another version or with
    // other engine settings.
    unsafe { Module::deserialize(engine, bytes.0) }
}
