//! Every `unsafe` block of this crate: foreign calls into BLAS, the CUDA
//! driver and the kernel's scheduler. Each function here is safe to call; each `unsafe` block states
//! why its preconditions hold.

#![allow(unsafe_code)]

pub(crate) mod blas;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod sched;
