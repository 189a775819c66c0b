//! The executor's only `unsafe`: loading compiled modules from its cache,
//! and mapping its own assets files.

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

/// A file mapped read-only.
#[derive(Debug)]
pub struct MappedFile(memmap2::Mmap);

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Maps `file` read-only. For the executor's own content-addressed files
/// (assets), which nothing writes after they are renamed into place.
pub fn map_readonly(file: &std::fs::File) -> std::io::Result<MappedFile> {
    // SAFETY: a mapping is unsafe because another process could change or
    // truncate the file while it is mapped, changing bytes behind shared
    // references (or faulting on a truncated page). The files mapped here
    // live in the executor's state directory under names that are their
    // contents' SHA-256; the executor writes each once, syncs it, renames it
    // into place and never opens it for writing again, and removes it only
    // by unlinking, which leaves an existing mapping intact. The state
    // directory belongs to the executor alone (`docs/CONFIG.md`).
    unsafe { memmap2::Mmap::map(file) }.map(MappedFile)
}
