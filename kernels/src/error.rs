//! Errors of tensor construction and tensor ops.
//!
//! Every error names the op that failed and why, and maps to exactly one
//! guest ABI code through [`KernelError::abi`]: that mapping lives here and
//! nowhere else.

use tensor_wasm_shared::{AbiError, DType};

/// Why an op or a tensor construction failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Operand shapes do not fit the op.
    #[error("{op}: shape mismatch: {detail}")]
    ShapeMismatch { op: &'static str, detail: String },

    /// The op does not take this dtype.
    #[error("{op}: dtype {dtype} is not supported")]
    DTypeUnsupported { op: &'static str, dtype: DType },

    /// Operands that must share a dtype do not.
    #[error("{op}: operand dtypes differ ({a} vs {b})")]
    DTypeMismatch {
        op: &'static str,
        a: DType,
        b: DType,
    },

    /// An argument is outside its domain: an axis, a permutation, an index,
    /// a byte length, a rank over the cap.
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument { op: &'static str, detail: String },

    /// A tensor would exceed the size cap, or its size overflows.
    #[error("{op}: tensor too large: {detail}")]
    TooLarge { op: &'static str, detail: String },

    /// The op's work estimate exceeds the per-op cap.
    #[error("{op}: {work} units of work exceed the per-op cap of {cap}")]
    WorkCapExceeded {
        op: &'static str,
        work: u64,
        cap: u64,
    },

    /// The device has no memory left for the result.
    #[error("{op}: device out of memory allocating {bytes} bytes")]
    OutOfMemory { op: &'static str, bytes: u64 },

    /// A tensor from another backend or device was passed in.
    #[error("{op}: tensor lives on {found}, not on this {expected} backend")]
    WrongDevice {
        op: &'static str,
        expected: &'static str,
        found: &'static str,
    },

    /// The device or its driver failed.
    #[error("device error: {0}")]
    Device(String),

    /// The invocation's deadline passed while the op ran
    /// ([`crate::deadline`]): it stopped between chunks of its work.
    #[error("{op}: the invocation's deadline passed")]
    DeadlineExceeded { op: &'static str },

    /// The backend cannot run here (no driver, no device, library missing).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}

impl KernelError {
    /// The guest ABI code this error is reported with.
    pub fn abi(&self) -> AbiError {
        match self {
            KernelError::ShapeMismatch { .. } => AbiError::ShapeMismatch,
            KernelError::DTypeUnsupported { .. } | KernelError::DTypeMismatch { .. } => {
                AbiError::DTypeUnsupported
            }
            KernelError::InvalidArgument { .. } | KernelError::WrongDevice { .. } => {
                AbiError::InvalidArgument
            }
            KernelError::TooLarge { .. }
            | KernelError::WorkCapExceeded { .. }
            | KernelError::OutOfMemory { .. }
            | KernelError::DeadlineExceeded { .. } => AbiError::QuotaExceeded,
            KernelError::Device(_) | KernelError::Unavailable(_) => AbiError::DeviceError,
        }
    }

    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        KernelError::ShapeMismatch {
            op,
            detail: detail.into(),
        }
    }

    pub(crate) fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        KernelError::InvalidArgument {
            op,
            detail: detail.into(),
        }
    }
}

/// Result of tensor ops.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
