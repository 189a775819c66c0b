//! Tensors and the TensorWasm op set, on the CPU and on CUDA GPUs.
//!
//! Every tensor op a tenant's function calls ends here. The crate has three
//! parts:
//!
//! - the tensor model: [`Tensor`] (dtype, dims, storage owned by a backend)
//!   and [`shape`], where every hostile shape is refused before any memory
//!   is touched, and every op is planned once for all backends;
//! - the [`Backend`] trait and its implementations: [`CpuBackend`], the
//!   reference and the embedded default (OpenBLAS for matmul, rayon for the
//!   rest), and, with the `cuda` feature, `cuda::CudaBackend` (cudarc,
//!   NVRTC-compiled kernels, cuBLAS);
//! - [`discovery`]: which GPUs and MIG slices this machine has, through
//!   NVML, behind a trait so that its logic is tested with fake devices.
//!
//! [`threads`] says which threads the CPU backend's parallel work runs on:
//! those of a tenant over its share of the cores run in the background.
//!
//! `unsafe` code lives only in the `sys` module (BLAS, CUDA and scheduler
//! calls).

#![deny(unsafe_code)]

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod deadline;
pub mod discovery;
pub mod error;
pub mod ops;
pub mod shape;
mod sys;
pub mod tensor;
pub mod threads;

pub use backend::{Backend, BackendKind};
pub use cpu::CpuBackend;
pub use error::{KernelError, Result};
pub use ops::{BinaryOp, ReduceOp, UnaryOp};
pub use shape::Limits;
pub use tensor::{CpuStorage, HostBuf, SharedBytes, Storage, Tensor};
pub use tensor_wasm_shared::DType;
