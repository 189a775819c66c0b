//! Every `unsafe` block of this crate: foreign calls into BLAS and the CUDA
//! driver. Each function here is safe to call; each `unsafe` block states
//! why its preconditions hold.

#![allow(unsafe_code)]

pub(crate) mod blas;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
