//! `pingora-minimal-mimalloc`: the minimal pingora proxy of
//! [`tensor_wasm_bench::pingora_minimal`] on mimalloc. pingora allocates
//! about 75 heap blocks per proxied request (one of them a 64 KiB body
//! buffer); mimalloc serves them with less CPU than glibc's malloc
//! (`bench/PROXY-FINDINGS.md`).

#![forbid(unsafe_code)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tensor_wasm_bench::pingora_minimal::run()
}
