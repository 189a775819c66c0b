//! `pingora-minimal`: the minimal pingora proxy of
//! [`tensor_wasm_bench::pingora_minimal`] on the system allocator.

#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    tensor_wasm_bench::pingora_minimal::run()
}
